"""SFT-family loops (alignops/train/loops/sft.py; docs/methods.md §2.25 RAFT, §2.27 DFT, §2.28
iw-SFT): RAFT's selection on hand-computed cases, iw-SFT's weights and gradient at q = pi_ref
against plain SFT in float64, the q refresh period, resume of q, bad options, the presets end to end."""

import copy
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from alignops.train import checkpoint as ckpt
from alignops.train.loops import sft
from alignops.train.loops.base import Run, parse_options
from alignops.train.rewards import RewardModel
from alignops.train.presets import make_config
from alignops.train.rollout import GroupSeeds, sequence_logits
from alignops.train.tasks import AdditionTask
from alignops.train.trainer import setup, train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)


@pytest.fixture
def varied_rewards(monkeypatch):
    """A random micro-policy almost never solves a sum: reward completion length parity instead."""
    monkeypatch.setattr(AdditionTask, "reward", lambda self, problem, completion: float(len(completion) % 2))


def micro(method, tmp_path, name=None, **overrides):
    return make_config(method, {**MICRO, "output_dir": str(tmp_path / (name or method)), **overrides})


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- RAFT selection (hand-computed)

@pytest.mark.parametrize("rewards, kwargs, expected", [
    ([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]], {}, [1, 3]),                                    # best per prompt
    ([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], {}, [0, 3]),                                    # ties: lowest index
    ([[0.0, 0.0], [0.0, 0.0]], {}, [0, 2]),                                              # all zero: still one each
    ([[0.0, 0.0], [0.0, 0.0]], {"min_reward": 1.0}, []),                                 # ... none with threshold
    ([[0.0, 1.0], [0.0, 0.0]], {"min_reward": 1.0}, [1]),                                # only prompt 0 qualifies
    ([[0.5, 0.2], [0.1, 0.4]], {"min_reward": 0.4}, [0, 3]),                             # >= is kept
    ([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]], {"ranking": "global"}, [1, 3]),                 # 1/K of 6 = 2 rows
    ([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]], {"ranking": "global"}, [0, 1]),                 # both from prompt 0
    ([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]], {"ranking": "global", "top_fraction": 0.5}, [0, 1, 2]),
    ([[1.0, 0.0], [1.0, 1.0]], {"ranking": "global", "top_fraction": 0.5}, [0, 2]),      # tie at the boundary
    ([[0.0, 0.0], [0.0, 0.0]], {"ranking": "global"}, [0, 1]),                           # all ties
    ([[0.0, 0.0], [0.0, 0.0]], {"ranking": "global", "min_reward": 0.5}, []),
    ([[0.3, 0.6], [0.9, 0.0]], {"ranking": "global", "top_fraction": 0.1}, [2]),         # at least one row
    ([[0.3, 0.6], [0.9, 0.0]], {"ranking": "global", "top_fraction": 1.0, "min_reward": 0.5}, [1, 2]),
    ([[0.3, 0.6, 0.2]], {}, [1]),                                                        # one prompt
    ([[0.3], [0.6]], {}, [0, 1]),                                                        # K = 1: every sample
])
def test_raft_select_hand_cases(rewards, kwargs, expected):
    assert sft.select(T(rewards), **kwargs) == expected


def test_raft_select_rejects_bad_input():
    with pytest.raises(ValueError, match="ranking"):
        sft.select(T([[1.0]]), "best")
    with pytest.raises(ValueError, match="rewards"):
        sft.select(torch.zeros(4))


# ---- iw-SFT

def build_loop(tmp_path, **loop_kwargs):
    cfg = micro("iw_sft", tmp_path, loop_kwargs=loop_kwargs)
    task, tok, policy = setup(cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    run = Run(cfg, task, tok, policy, opt, random.Random(0), GroupSeeds(0, "cpu"),
              RewardModel(cfg.reward_funcs, cfg.reward_weights), str(tmp_path))
    return run, sft.IWSFTLoop(run, parse_options(sft.IWSFTLoop, loop_kwargs, "iw_sft"))


def plain_sft_grads(policy, batch):
    """Token-mean NLL of the completion tokens in float64, by hand from the logits."""
    policy.zero_grad(set_to_none=True)
    logits = sequence_logits(policy, batch).double()
    logp = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.completion_mask.double()
    (-(logp * mask).sum() / mask.sum()).backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def test_iw_sft_at_q_equal_pi_ref_is_plain_sft(tmp_path):
    run, loop = build_loop(tmp_path)
    problems = run.task.sample(run.rng, 4)
    batch, _ = run.sample([p.prompt for p in problems], 2)
    seq_ref = run.sequence_logprobs(batch)            # q is still the policy: q = pi_ref
    out, weights = loop.loss(batch, seq_ref)
    assert torch.equal(weights, torch.ones_like(weights))
    run.policy.zero_grad(set_to_none=True)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in run.policy.named_parameters() if p.grad is not None}
    want = plain_sft_grads(run.policy, batch)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n].double(), rtol=1e-4, atol=1e-6)


def test_iw_sft_weights_are_clipped_ratio_of_q_to_pi_ref(tmp_path):
    run, loop = build_loop(tmp_path, w_min=0.5, w_max=2.0)
    problems = run.task.sample(run.rng, 3)
    batch, _ = run.sample([p.prompt for p in problems], 1)
    seq_q = run.sequence_logprobs(batch).double()
    offsets = torch.tensor([-3.0, 0.3, 3.0], dtype=torch.float64)   # pi_ref = q - offset
    _, weights = loop.loss(batch, (seq_q - offsets).float())
    expected = offsets.exp().clamp(0.5, 2.0)                         # [0.5, e^0.3, 2.0]
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-5)


def test_iw_sft_q_refreshes_every_period(tmp_path, varied_rewards):
    run, loop = build_loop(tmp_path, q_update_every=3)
    snapshots = {}
    for step in range(7):
        snapshots[step] = copy.deepcopy(run.policy.state_dict())   # the policy entering the step
        loop.step(step)
        held = loop.q.state_dict()
        expected_from = 6 if step >= 6 else 3 if step >= 3 else 0   # refreshed at the start of steps 3 and 6
        assert loop.q_step == expected_from
        assert all(torch.equal(held[k], snapshots[expected_from][k]) for k in held)
    assert any(not torch.equal(snapshots[6][k], snapshots[0][k]) for k in held)   # the policy did move


def test_iw_sft_resumes_exactly_with_its_q(tmp_path, varied_rewards):
    # q refreshed at step 2, checkpoint after step 3, resumed steps 3..4: only an exact q (and q_step) resumes exactly
    kw = {"loop_kwargs": {"q_update_every": 2}}
    straight = train(micro("iw_sft", tmp_path, "a", max_steps=5, **kw))
    train(micro("iw_sft", tmp_path, "b", max_steps=3, **kw))
    out = micro("iw_sft", tmp_path, "b").resolved_output_dir()
    state = json.load(open(os.path.join(out, ckpt.CHECKPOINT_SUBDIR, "state.json")))
    q = load_file(os.path.join(out, ckpt.CHECKPOINT_SUBDIR, "loop_q.safetensors"))
    assert state["loop"] == {"q_step": 2} and q
    resumed = train(micro("iw_sft", tmp_path, "b", max_steps=5, resume=True, **kw))
    losses = [[r["loss"] for r in res["log"] if "loss" in r] for res in (straight, resumed)]
    assert losses[0][3:] == losses[1][-2:] and len(losses[0]) == 5
    assert [r["iw/q_age"] for r in straight["log"] if "loss" in r] == [0, 1, 0, 1, 0]


# ---- the presets end to end

@pytest.mark.parametrize("method, loop_kwargs", [
    ("raft", {}), ("raft", {"ranking": "global", "top_fraction": 0.5, "sft_epochs": 2, "min_reward": None}),
    ("dft", {}), ("iw_sft", {"self_normalize": True}),
])
def test_preset_runs_and_updates(method, loop_kwargs, tmp_path, varied_rewards):
    cfg = micro(method, tmp_path, loop_kwargs=loop_kwargs)
    before = copy.deepcopy(setup(cfg)[2].state_dict())
    rows = [r for r in train(cfg)["log"] if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    after = setup(cfg)[2]
    ckpt.load_model_weights(cfg.resolved_output_dir(), after)
    assert any(not torch.equal(before[k], after.state_dict()[k]) for k in before)
    if method != "dft":
        assert all(0.0 <= r["reward"] <= 1.0 for r in rows)


def test_raft_with_no_qualifying_sample_skips_the_update(tmp_path, monkeypatch):
    monkeypatch.setattr(AdditionTask, "reward", lambda self, problem, completion: 0.0)
    cfg = micro("raft", tmp_path)
    before = copy.deepcopy(setup(cfg)[2].state_dict())
    rows = [r for r in train(cfg)["log"] if "loss" in r]
    assert all(r["raft/selected"] == 0 and r["skipped_update"] == 1.0 for r in rows)
    after = setup(cfg)[2]
    ckpt.load_model_weights(cfg.resolved_output_dir(), after)
    assert all(torch.equal(before[k], after.state_dict()[k]) for k in before)


@pytest.mark.parametrize("method, loop_kwargs, match", [
    ("raft", {"ranking": "best"}, "method 'raft': ranking must be one of"),
    ("raft", {"K": 0}, "method 'raft': K must be >= 1"),
    ("raft", {"sft_epochs": 0}, "method 'raft': sft_epochs must be >= 1"),
    ("raft", {"ranking": "global", "top_fraction": 0.0}, "method 'raft': top_fraction must be in"),
    ("raft", {"top_fraction": 0.5}, "method 'raft': top_fraction applies to ranking='global'"),
    ("raft", {"bogus": 1}, "unknown --loop_kwargs"),
    ("dft", {"batch_size": 0}, "method 'dft': batch_size must be >= 1"),
    ("iw_sft", {"q_update_every": 0}, "method 'iw_sft': q_update_every must be >= 1"),
    ("iw_sft", {"w_min": 2.0, "w_max": 1.0}, "method 'iw_sft': need 0 <= w_min <= w_max"),
    ("iw_sft", {"w_min": -1.0}, "method 'iw_sft': need 0 <= w_min <= w_max"),
])
def test_bad_options_fail_before_training(method, loop_kwargs, match, tmp_path):
    cfg = micro(method, tmp_path, loop_kwargs=loop_kwargs)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.resolved_output_dir(), "metrics.jsonl"))
