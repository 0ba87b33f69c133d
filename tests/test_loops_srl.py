"""SRL (alignops/train/loops/srl.py, docs/methods.md §2.30): the difflib step reward, the step
decomposition, the std filter with refill, the format warm-up, the chained-step evaluation, and
the preset end to end."""

import copy
import dataclasses
import os
import statistics

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train.loops import format_grpo, srl
from alignops.train.loops.base import Run
from alignops.train.presets import make_config
from alignops.train.tasks import AdditionTask, Problem
from alignops.train.trainer import setup, train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)


def micro(tmp_path, **loop_kwargs):
    return make_config("srl", {**MICRO, "output_dir": str(tmp_path / "srl"), "loop_kwargs": loop_kwargs})


def weights_after(cfg):
    _, _, model = setup(cfg)
    ckpt.load_model_weights(cfg.resolved_output_dir(), model)
    return model.state_dict()


def initial_weights(cfg):
    return copy.deepcopy(setup(cfg)[2].state_dict())


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


# ---- the reward (docs oracle: "abcd" vs "bcde": M = 3 ("bcd"), T = 8 -> 2M/T = 0.75)

@pytest.mark.parametrize("output, expert, expected", [
    ("#abcd", "bcde", 0.75),
    ("some reasoning#abcd", "bcde", 0.75),
    ("#7+8=15", "7+8=15", 1.0),
    ("#12", "123", 0.8),          # M = 2, T = 5
    ("#99", "85", 0.0),           # no common character
    ("1#2#85", "85", 1.0),        # the action follows the last '#'
    ("# 85 ", "85", 1.0),         # spaces around the action are not part of it
])
def test_step_reward_is_difflib_ratio_of_the_action(output, expected, expert):
    assert srl.srl_reward(output, expert) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("output", ["abcd", "85", "", "3+4#", "3+4# ", "#"])
def test_malformed_output_scores_minus_one(output):
    assert srl.srl_reward(output, "85") == -1.0


def test_an_output_cut_by_the_token_limit_is_malformed():
    scores = srl.score_outputs(["#85", "#85", "#8", "x"], [False, True, False, False], ["85", "85", "85", "85"])
    assert scores.tolist() == [1.0, -1.0, pytest.approx(2 / 3), -1.0]


def test_long_steps_are_not_junked():
    # difflib's autojunk (on by default from 200 items) ignores popular characters, which scores a long
    # identical pair 0; the reward fixes autojunk=False, so identical strings score 1 whatever their length
    assert srl.srl_reward("#" + "1" * 300, "1" * 300) == 1.0


# ---- step decomposition

def test_split_steps_of_37_plus_48_by_hand():
    problem = Problem("37+48=", "85", ("7+8=15", "3+4+1=8", "85"))
    assert srl.split_steps(problem) == [("37+48=;", "7+8=15"), ("37+48=;7+8=15;", "3+4+1=8"),
                                        ("37+48=;7+8=15;3+4+1=8;", "85")]


def test_the_task_steps_of_a_known_problem():
    task = AdditionTask()
    problem = next(p for p in task.train + task.heldout if p.prompt == "5+9=")
    assert srl.split_steps(problem) == [("5+9=;", "5+9=14"), ("5+9=;5+9=14;", "14")]
    assert srl.split_steps(Problem("1+1=", "2")) == []  # no expert steps: no step-prompts


def test_step_prompts_never_equal_the_plain_prompt():
    task = AdditionTask()
    for p in task.heldout[:50]:
        assert all(prompt != p.prompt and prompt.startswith(p.prompt) for prompt, _ in srl.split_steps(p))


# ---- the loop

@pytest.fixture
def parity_reward(monkeypatch):
    """A random micro policy writes malformed steps (all -1): reward output length parity instead."""
    monkeypatch.setattr(srl, "score_outputs",
                        lambda texts, cut, experts: torch.tensor([len(t) % 2 for t in texts], dtype=torch.float32))


def test_srl_runs_end_to_end_and_updates(tmp_path, parity_reward):
    cfg = micro(tmp_path, format_warmup_steps=0)
    before = initial_weights(cfg)
    rows = train(cfg)["log"]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert {"reward", "loss", "grad_norm", "srl/kept_groups", "srl/malformed_frac"} <= set(r)
        assert r["srl/warmup"] == 0 and r["skipped_update"] == 0 and 1 <= r["srl/kept_groups"] <= 2
        assert torch.isfinite(torch.tensor(r["loss"])) and 0 <= r["reward"] <= 1
    assert {"eval/accuracy", "eval/srl_step_similarity", "eval/srl_chain_accuracy"} <= set(rows[-1])
    assert changed(before, weights_after(cfg))


def test_the_std_filter_trains_only_on_groups_whose_rewards_differ(tmp_path, monkeypatch):
    # column steps (with '=') get parity rewards, answer steps a constant: their groups must be dropped
    monkeypatch.setattr(srl, "score_outputs", lambda texts, cut, experts: torch.tensor(
        [float(len(t) % 2) if "=" in e else 0.3 for t, e in zip(texts, experts)]))
    seen = []
    real = srl.grpo_update

    def spy(run, batch, rewards, mask, step, max_len, replay=None):
        seen.append(None if rewards is None else rewards.view(-1, run.cfg.num_generations).tolist())
        return real(run, batch, rewards, mask, step, max_len, replay)

    monkeypatch.setattr(srl, "grpo_update", spy)
    rows = train(micro(tmp_path, format_warmup_steps=0, max_sampling_rounds=6))["log"]
    groups = [g for s in seen if s for g in s]
    assert groups and all(statistics.pstdev(g) > 1e-6 for g in groups)
    assert all(len(s) <= 2 for s in seen if s)
    assert [len(s) if s else 0 for s in seen] == [r["srl/kept_groups"] for r in rows if "loss" in r]


def test_no_informative_group_is_a_zero_loss_step(tmp_path, monkeypatch):
    monkeypatch.setattr(srl, "score_outputs", lambda texts, cut, experts: torch.full((len(texts),), 0.5))  # std 0
    cfg = micro(tmp_path, format_warmup_steps=0, max_sampling_rounds=3)
    before = initial_weights(cfg)
    steps = [r for r in train(cfg)["log"] if "loss" in r]
    assert [(r["loss"], r["grad_norm"], r["srl/kept_groups"], r["sampling/gen_rounds"], r["skipped_update"])
            for r in steps] == [(0.0, 0.0, 0, 3, 1.0)] * 2
    assert all(r["reward"] == 0.5 for r in steps)
    assert not changed(before, weights_after(cfg))


def test_warmup_steps_are_sft_on_hash_plus_expert_step(tmp_path, monkeypatch):
    targets = []
    real = Run.teacher_batch

    def spy(self, prompts, completions, eos=True):
        targets.extend(zip(prompts, completions))
        return real(self, prompts, completions, eos)

    monkeypatch.setattr(Run, "teacher_batch", spy)
    rows = train(micro(tmp_path, format_warmup_steps=2, warmup_batch_size=5, replay_coef=0.0))["log"]
    assert [r["srl/warmup"] for r in rows if "loss" in r] == [1.0, 1.0]
    assert all(r["sft/tokens"] > 0 for r in rows if "loss" in r)
    assert len(targets) == 10
    for prompt, target in targets:
        a, rest = prompt.split("+", 1)
        b, done = rest.split("=;", 1)
        assert target.startswith("#")
        step = target[1:]
        if "=" not in step:       # the last step is the answer
            assert step == str(int(a) + int(b))
        else:                     # a column step x+y(+carry)=s is arithmetic that holds
            lhs, s = step.split("=")
            assert sum(int(x) for x in lhs.split("+")) == int(s)
        assert done == "" or done.endswith(";")


def test_chained_steps_solve_with_a_perfect_stepper_and_fail_with_a_malformed_one(tmp_path, monkeypatch):
    cfg = micro(tmp_path)
    task = AdditionTask()
    run = Run(cfg, task, None, None, None, None, None, None, str(tmp_path))  # sampling is replaced below
    loop = srl.SRLLoop(run, srl.SRLOptions())
    problems = task.heldout[:8]
    expert = {prompt: step for p in problems for prompt, step in srl.split_steps(p)}
    monkeypatch.setattr(Run, "sample", lambda self, prompts, n=1, **kw: (None, ["#" + expert[p] for p in prompts]))
    assert loop._chain_accuracy(problems) == 1.0
    monkeypatch.setattr(Run, "sample", lambda self, prompts, n=1, **kw: (None, ["85" for _ in prompts]))
    assert loop._chain_accuracy(problems) == 0.0
    assert loop._chain_accuracy([]) == 0.0


# ---- self-replay (not in the paper: docs/loops/srl.md)

def greedy_ids(model, tok, prompt: str, max_new: int) -> list[int]:
    """Independent greedy decode: one prompt, no padding, the argmax of a full forward per token."""
    ids, out = tok.encode(prompt, bos=True), []
    with torch.no_grad():
        for _ in range(max_new):
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
            if out[-1] == tok.eos_token_id:
                break
    return out


def plain_sft_rows(monkeypatch) -> list:
    """Records, per Run.sft_loss call whose prompts are all plain (no ';'), its (prompt, completion ids)."""
    seen, real = [], Run.sft_loss

    def spy(self, batch, **kw):
        P, rows = batch.prompt_len, []
        for r in range(batch.input_ids.shape[0]):
            prompt = batch.input_ids[r, :P][batch.attention_mask[r, :P] == 1]
            rows.append((self.tok.decode(prompt), batch.completion_ids[r][batch.completion_mask[r] > 0].tolist()))
        if all(";" not in p for p, _ in rows):
            seen.append(rows)
        return real(self, batch, **kw)

    monkeypatch.setattr(Run, "sft_loss", spy)
    return seen


def paper_warmup_sft_step(run, batch, step, learning_rate, replay=None):
    """The warm-up update before self-replay existed (the oracle of replay_coef=0)."""
    run_lr, run.cfg.learning_rate = run.cfg.learning_rate, learning_rate
    try:
        return run.sft_step(batch, step)
    finally:
        run.cfg.learning_rate = run_lr


def paper_grpo_update(run, batch, rewards, mask, step, max_len, replay=None):
    """The GRPO update before self-replay existed."""
    if batch is None or float(mask.sum()) == 0:
        return {"loss": 0.0, "grad_norm": 0.0, "skipped_update": 1.0}
    out = format_grpo.grpo_loss(run.cfg, run.head(batch), batch, rewards, mask, max_len, run.cfg.num_generations)
    return {**run.optimizer_step(out.loss, step), "skipped_update": 0.0}


def test_replay_targets_are_the_frozen_bases_greedy_answers_to_plain_prompts(tmp_path, monkeypatch, parity_reward):
    # a high warm-up rate, so that the policy's own greedy answers move away from the base's
    cfg = dataclasses.replace(micro(tmp_path, format_warmup_steps=2, warmup_batch_size=3, replay_batch=5,
                                    replay_pool=7, warmup_learning_rate=0.05), max_steps=3)
    task, tok, base = setup(cfg)
    base = copy.deepcopy(base)
    seen = plain_sft_rows(monkeypatch)
    rows = [r for r in train(cfg)["log"] if "loss" in r]
    updates = [r for r in rows if r["srl/warmup"] == 1 or r["skipped_update"] == 0]
    assert len(updates) >= 2 and len(seen) == len(updates)  # one replay batch per update, GRPO ones included
    assert all("replay/nll" in r for r in updates)
    train_prompts = {p.prompt for p in task.train}
    expected = {}
    for batch_rows in seen:
        assert len(batch_rows) == 5 and len({p for p, _ in batch_rows}) == 5
        for prompt, completion in batch_rows:
            assert prompt in train_prompts and prompt.endswith("=")
            expected.setdefault(prompt, greedy_ids(base, tok, prompt, cfg.max_completion_length))
            assert completion == expected[prompt]  # the base's, even after the policy has moved
    state = ckpt.load_json(os.path.join(ckpt.locate(cfg.resolved_output_dir()), "state.json"))
    pool = state["loop"]["replay_pool"]  # saved, so that a resume keeps replaying the base, not itself
    assert len(pool) == 7 and set(expected) <= {p for p, _ in pool}
    assert all(c == greedy_ids(base, tok, p, cfg.max_completion_length) for p, c in pool)
    trained = setup(cfg)[2]
    trained.load_state_dict(weights_after(cfg))
    assert any(c != greedy_ids(trained, tok, p, cfg.max_completion_length) for p, c in pool)  # it did move


def test_the_replay_term_adds_coef_times_the_replay_nll(tmp_path, monkeypatch):
    losses, real = [], Run.optimizer_step
    monkeypatch.setattr(Run, "optimizer_step", lambda self, loss, step: (losses.append(float(loss.detach())),
                                                                         real(self, loss, step))[1])
    seen = plain_sft_rows(monkeypatch)
    rows = {}
    for coef in (0.0, 0.5):
        cfg = dataclasses.replace(micro(tmp_path / str(coef), format_warmup_steps=1, warmup_batch_size=4,
                                        replay_batch=6, replay_coef=coef), max_steps=1)
        rows[coef] = [r for r in train(cfg)["log"] if "loss" in r][0]
    assert len(seen) == 1 and "replay/nll" not in rows[0.0]
    _, tok, base = setup(cfg)
    base = base.double()
    nll, n = 0.0, 0
    for prompt, completion in seen[0]:  # float64 token-mean NLL of the replay rows under the base
        ids = tok.encode(prompt, bos=True)
        with torch.no_grad():
            logp = torch.log_softmax(base(input_ids=torch.tensor([ids + completion])).logits[0], -1)
        nll -= sum(float(logp[len(ids) - 1 + t, c]) for t, c in enumerate(completion))
        n += len(completion)
    assert rows[0.5]["replay/nll"] == pytest.approx(nll / n, rel=1e-4)
    assert losses[1] - losses[0] == pytest.approx(0.5 * nll / n, rel=1e-4)


def test_replay_coef_zero_is_exactly_the_papers_update(tmp_path, monkeypatch, parity_reward):
    def run_with(name, **loop_kwargs):
        cfg = dataclasses.replace(micro(tmp_path / name, format_warmup_steps=1, warmup_batch_size=3,
                                        **loop_kwargs), max_steps=3)
        rows = [r for r in train(cfg)["log"] if "loss" in r]
        return [(r["loss"], r["grad_norm"]) for r in rows], weights_after(cfg)

    with monkeypatch.context() as m:
        m.setattr(srl.SelfReplay, "collect", lambda self: pytest.fail("replay_coef=0 must not collect a pool"))
        off_rows, off = run_with("off", replay_coef=0.0)
    with monkeypatch.context() as m:
        m.setattr(srl, "warmup_sft_step", paper_warmup_sft_step)
        m.setattr(srl, "grpo_update", paper_grpo_update)
        paper_rows, paper = run_with("paper")
    on_rows, on = run_with("on", replay_coef=1.0)
    assert off_rows == paper_rows and not changed(off, paper)
    assert changed(off, on)  # and the replay does change the update


@pytest.mark.parametrize("overrides, match", [
    ({"loop_kwargs": {"replay_coef": -0.1}}, "method 'srl': replay_coef must be >= 0"),
    ({"loop_kwargs": {"replay_batch": 0}}, "method 'srl': replay_batch must be >= 1"),
    ({"loop_kwargs": {"replay_pool": 0}}, "method 'srl': replay_pool must be >= 1"),
    ({"loop_kwargs": {"max_new_tokens": 1}}, "method 'srl': max_new_tokens must be >= 2"),
    ({"loop_kwargs": {"std_eps": -1.0}}, "method 'srl': std_eps must be >= 0"),
    ({"loop_kwargs": {"max_sampling_rounds": 0}}, "method 'srl': max_sampling_rounds must be >= 1"),
    ({"loop_kwargs": {"format_warmup_steps": -1}}, "method 'srl': format_warmup_steps must be >= 0"),
    ({"loop_kwargs": {"warmup_batch_size": 0}}, "method 'srl': warmup_batch_size must be >= 1"),
    ({"beta": 0.1}, "method 'srl' keeps no reference model: --beta must be 0"),
    ({"num_generations": 1}, "num_generations must be >= 2"),
])
def test_bad_options_fail_before_training(tmp_path, overrides, match):
    cfg = dataclasses.replace(micro(tmp_path), **overrides)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not os.path.exists(tmp_path / "srl" / "metrics.jsonl")
