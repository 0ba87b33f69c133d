"""Reflect, Retry, Reward (alignops/train/loops/reflect.py, docs/methods.md §2.31): the
reflection-only mask, zero gradient at attempt 2's answer positions, no training rows from solved
first attempts, the held-out second-attempt success, and the preset end to end."""

import copy
import dataclasses
import os

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train.loops import reflect
from alignops.train.loops.base import Run
from alignops.train.loops import srl
from alignops.train.loops.format_grpo import grpo_loss
from alignops.train.presets import make_config
from alignops.train.rollout import Batch, HeadOutput
from alignops.train.tasks import AdditionTask
from alignops.train.tokenizer import CharTokenizer
from alignops.train.trainer import setup, train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)
M = 9  # a marker id in the hand-made rows below


def micro(tmp_path, **loop_kwargs):
    return make_config("reflect_retry_reward", {**MICRO, "output_dir": str(tmp_path / "rrr"),
                                                "loop_kwargs": loop_kwargs})


def weights(cfg, trained: bool):
    _, _, model = setup(cfg)
    if trained:
        ckpt.load_model_weights(cfg.resolved_output_dir(), model)
    return copy.deepcopy(model.state_dict())


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def first_operand(problem) -> int:
    return int(problem.prompt.split("+")[0])


# ---- the mask

def test_reflection_mask_by_hand():
    ids = torch.tensor([[7, 7, M, 8, 2, 0],     # reflection "77#", answer "8", EOS
                        [M, 7, M, 8, 8, 2],     # the last marker closes the reflection
                        [7, 8, 2, 0, 0, 0],     # no marker: no reflection, nothing trained
                        [7, 7, 8, 2, M, M],     # markers in the padding do not count
                        [M, 2, 0, 0, 0, 0]])    # an empty reflection: only its marker
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    expected = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0] * 6, [0] * 6, [1, 0, 0, 0, 0, 0]]
    assert reflect.reflection_mask(ids, mask, M).tolist() == expected


def test_reflection_mask_of_an_empty_batch():
    assert reflect.reflection_mask(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), M).shape == (0, 4)


# ---- the gradient never reaches attempt 2's answer

def _retry_batch():
    ids = torch.tensor([[5, 6, M, 7, 8, 2], [6, M, 7, 2, 0, 0], [5, 5, 5, M, 8, 2], [7, 8, 2, 0, 0, 0]])
    cmask = (torch.arange(6) < torch.tensor([6, 4, 6, 3])[:, None]).float()
    prompt = torch.full((4, 2), 4)
    return Batch(torch.cat([prompt, ids], 1), torch.cat([torch.ones(4, 2, dtype=torch.long), cmask.long()], 1), 2,
                 ids, cmask, torch.zeros(4, 6), torch.zeros(4, dtype=torch.bool))


@pytest.mark.parametrize("fused_lm_head", [False, True])
def test_the_gradient_at_answer_positions_is_exactly_zero(tmp_path, fused_lm_head):
    cfg = dataclasses.replace(micro(tmp_path), fused_lm_head=fused_lm_head)
    batch = _retry_batch()
    mask = reflect.reflection_mask(batch.completion_ids, batch.completion_mask, M)
    answer = (batch.completion_mask > 0) & (mask == 0)
    assert answer.sum() == 10 and mask.sum() == 9  # by hand: answers 3+2+2+3, reflections 3+2+4+0
    torch.manual_seed(0)
    V, H = 20, 8
    if fused_lm_head:
        leaf = torch.randn(4, 6, H, requires_grad=True)
        head = HeadOutput(hidden=leaf, weight=torch.randn(V, H))
    else:
        leaf = torch.randn(4, 6, V, requires_grad=True)
        head = HeadOutput(logits=leaf)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = grpo_loss(cfg, head, batch, rewards, mask, max_len=6, group_size=4).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.count_nonzero(leaf.grad[answer]) == 0
    assert torch.count_nonzero(leaf.grad[(batch.completion_mask == 0)]) == 0
    assert all(leaf.grad[r, t].abs().sum() > 0 for r, t in mask.nonzero().tolist())


def test_the_answer_tokens_log_probs_do_not_change_the_loss(tmp_path):
    cfg = dataclasses.replace(micro(tmp_path), fused_lm_head=False)
    batch = _retry_batch()
    mask = reflect.reflection_mask(batch.completion_ids, batch.completion_mask, M)
    answer = (batch.completion_mask > 0) & (mask == 0)
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 20)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    base = grpo_loss(cfg, HeadOutput(logits=logits), batch, rewards, mask, 6, 4).loss
    moved = grpo_loss(cfg, HeadOutput(logits=logits + 5 * torch.randn(4, 6, 20) * answer[..., None]),
                      batch, rewards, mask, 6, 4).loss
    assert float(base) == float(moved)


# ---- the loop

def test_solved_first_attempts_produce_no_training_rows(tmp_path, monkeypatch):
    # the verifier accepts anything for an even first operand: those prompts are never retried
    monkeypatch.setattr(AdditionTask, "reward", lambda self, p, c: float(first_operand(p) % 2 == 0))
    retries = []
    real = Run.sample

    def spy(self, prompts, n=1, **kw):
        if n > 1:
            retries.append((list(prompts), n))
        return real(self, prompts, n, **kw)

    monkeypatch.setattr(Run, "sample", spy)
    cfg = micro(tmp_path, format_warmup_steps=0)
    rows = [r for r in train(cfg)["log"] if "loss" in r]
    assert len(rows) == 2
    failures = [r["rrr/first_attempt_failures"] for r in rows]
    assert [len(p) for p, _ in retries] == [f for f in failures if f] and sum(failures) > 0
    for prompts, n in retries:
        assert n == 4 and all(int(p.split("+")[0]) % 2 == 1 and p.endswith(";") for p in prompts)


def test_an_all_solved_batch_is_a_finite_zero_loss_step(tmp_path, monkeypatch):
    monkeypatch.setattr(AdditionTask, "reward", lambda self, p, c: 1.0)
    cfg = micro(tmp_path, format_warmup_steps=0)
    before = weights(cfg, trained=False)
    rows = [r for r in train(cfg)["log"] if "loss" in r]
    assert [(r["loss"], r["grad_norm"], r["skipped_update"], r["rrr/first_attempt_failures"], r["rrr/final_accuracy"])
            for r in rows] == [(0.0, 0.0, 1.0, 0.0, 1.0)] * 2
    assert not any("reward" in r for r in rows)  # no retry was sampled: no sample reward to report
    assert not changed(before, weights(cfg, trained=True))


def test_retries_that_all_fail_leave_the_weights_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(AdditionTask, "reward", lambda self, p, c: 0.0)
    cfg = micro(tmp_path, format_warmup_steps=0)
    before = weights(cfg, trained=False)
    rows = [r for r in train(cfg)["log"] if "loss" in r]
    assert [(r["loss"], r["skipped_update"], r["rrr/first_attempt_failures"], r["reward"], r["rrr/kept_groups"])
            for r in rows] == [(0.0, 1.0, 2.0, 0.0, 0.0)] * 2
    assert not changed(before, weights(cfg, trained=True))


def test_reflect_retry_reward_runs_end_to_end_and_updates(tmp_path, monkeypatch):
    # a random micro policy never solves a sum: every first attempt (at most 3 tokens) fails, and the
    # longer retries are rewarded by length parity (signal in most groups)
    monkeypatch.setattr(AdditionTask, "reward", lambda self, p, c: float(len(c) % 2) if len(c) > 3 else 0.0)
    cfg = micro(tmp_path, format_warmup_steps=1)
    cfg = dataclasses.replace(cfg, max_steps=3)
    before = weights(cfg, trained=False)
    rows = train(cfg)["log"]
    steps = [r for r in rows if "loss" in r]
    assert [r["rrr/warmup"] for r in steps] == [1.0, 0.0, 0.0]
    for r in steps[1:]:
        assert {"reward", "loss", "grad_norm", "rrr/first_attempt_failures", "rrr/second_attempt_success"} <= set(r)
        assert torch.isfinite(torch.tensor(r["loss"])) and r["rrr/first_attempt_failures"] == 2
    assert any(r["skipped_update"] == 0 and r["grad_norm"] > 0 for r in steps[1:])
    final = rows[-1]
    assert {"eval/accuracy", "eval/second_attempt_success", "eval/first_attempt_failures"} <= set(final)
    assert changed(before, weights(cfg, trained=True))


def test_the_default_retry_budget_holds_the_longest_expert_solution(tmp_path):
    """With 8 reflection tokens + 6 (the old default) a retry was cut before the answer of every
    two-digit sum with steps, e.g. '7+8=15;3+4+1=8#85' (18 tokens with EOS): attempt 2 could never
    be right. The default now derives the budget from the task."""
    task = AdditionTask()
    longest = max(len(p.expert_completion(with_steps=True)) for p in task.train) + 1
    assert longest == 20  # '9+9=18;9+9+1=19#198' + EOS, counted here by hand from the task
    for max_len in (3, 6):
        cfg = dataclasses.replace(micro(tmp_path), max_completion_length=max_len)
        run = Run(cfg, task, CharTokenizer(task.alphabet), None, None, None, None, None, str(tmp_path))
        assert reflect.ReflectRetryLoop(run, reflect.ReflectOptions()).retry_tokens == longest
        loop = reflect.ReflectRetryLoop(run, reflect.ReflectOptions(reflection_tokens=30))
        assert loop.retry_tokens == 30 + max_len


def test_the_held_out_second_attempt_success(tmp_path, monkeypatch):
    cfg = micro(tmp_path)
    task = AdditionTask()
    run = Run(cfg, task, CharTokenizer(task.alphabet), None, None, None, None, None, str(tmp_path))  # no model:
    # sampling and the trainer's evaluation are replaced below
    loop = reflect.ReflectRetryLoop(run, reflect.ReflectOptions())
    problems = task.heldout[:8]
    answers = {p.prompt: str(first_operand(p) + int(p.prompt[:-1].split("+")[1])) for p in problems}

    def fake(self, prompts, n=1, **kw):  # first attempts all wrong; retries right for even first operands
        out = []
        for prompt in prompts:
            if prompt.endswith(";"):
                plain = prompt[:prompt.index("=") + 1]
                out.append("1+1#" + (answers[plain] if int(plain.split("+")[0]) % 2 == 0 else "9999"))
            else:
                out.append("-1")
        return None, out

    monkeypatch.setattr(Run, "sample", fake)
    monkeypatch.setattr(Run, "evaluate", lambda self: {"eval/accuracy": 0.0})
    row = loop.evaluate()
    even = sum(first_operand(p) % 2 == 0 for p in problems)
    assert row["eval/first_attempt_failures"] == 8
    assert row["eval/second_attempt_success"] == pytest.approx(even / 8)
    assert row["eval/accuracy_after_retry"] == pytest.approx(even / 8)
    monkeypatch.setattr(Run, "sample", lambda self, prompts, n=1, **kw: (None, [answers[p] for p in prompts]))
    row = loop.evaluate()  # no first-attempt failure: nothing to retry
    assert row["eval/first_attempt_failures"] == 0 and row["eval/second_attempt_success"] == 0.0
    assert row["eval/accuracy_after_retry"] == 1.0


# ---- self-replay (shared with SRL, not in the paper: docs/loops/reflect.md)

def greedy_ids(model, tok, prompt: str, max_new: int) -> list[int]:
    """Independent greedy decode: one prompt, no padding, the argmax of a full forward per token."""
    ids, out = tok.encode(prompt, bos=True), []
    with torch.no_grad():
        for _ in range(max_new):
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
            if out[-1] == tok.eos_token_id:
                break
    return out


@pytest.fixture
def parity_retries(monkeypatch):
    # as in the end-to-end test: long retries rewarded by length parity, so GRPO steps update
    monkeypatch.setattr(AdditionTask, "reward", lambda self, p, c: float(len(c) % 2) if len(c) > 3 else 0.0)


def test_replay_rows_are_the_frozen_bases_greedy_answers(tmp_path, monkeypatch, parity_retries):
    seen, real = [], Run.sft_loss

    def spy(self, batch, **kw):  # plain-prompt SFT rows only (warm-up rows have ';' in the prompt)
        P = batch.prompt_len
        rows = [(self.tok.decode(batch.input_ids[r, :P][batch.attention_mask[r, :P] == 1]),
                 batch.completion_ids[r][batch.completion_mask[r] > 0].tolist()) for r in range(len(batch.input_ids))]
        if all(";" not in p for p, _ in rows):
            seen.append(rows)
        return real(self, batch, **kw)

    monkeypatch.setattr(Run, "sft_loss", spy)
    # a high warm-up rate, so that the policy's own greedy answers move away from the base's
    cfg = dataclasses.replace(micro(tmp_path, format_warmup_steps=2, warmup_batch_size=3, replay_batch=4,
                                    replay_pool=6, warmup_learning_rate=0.05), max_steps=3)
    task, tok, base = setup(cfg)
    steps = [r for r in train(cfg)["log"] if "loss" in r]
    updates = [r for r in steps if r["rrr/warmup"] == 1 or r["skipped_update"] == 0]
    assert len(updates) >= 2 and len(seen) == len(updates) and all("replay/nll" in r for r in updates)
    train_prompts = {p.prompt for p in task.train}
    for rows in seen:
        assert len(rows) == 4
        for prompt, completion in rows:
            assert prompt in train_prompts
            assert completion == greedy_ids(base, tok, prompt, cfg.max_completion_length)
    trained = setup(cfg)[2]
    trained.load_state_dict(weights(cfg, trained=True))
    assert any(c != greedy_ids(trained, tok, p, cfg.max_completion_length) for rows in seen for p, c in rows)


def test_replay_coef_zero_is_exactly_the_papers_update(tmp_path, monkeypatch, parity_retries):
    def paper_warmup(run, batch, step, learning_rate, replay=None):
        run_lr, run.cfg.learning_rate = run.cfg.learning_rate, learning_rate
        try:
            return run.sft_step(batch, step)
        finally:
            run.cfg.learning_rate = run_lr

    def paper_grpo(run, batch, rewards, mask, step, max_len, replay=None):
        if batch is None or float(mask.sum()) == 0:
            return {"loss": 0.0, "grad_norm": 0.0, "skipped_update": 1.0}
        out = grpo_loss(run.cfg, run.head(batch), batch, rewards, mask, max_len, run.cfg.num_generations)
        return {**run.optimizer_step(out.loss, step), "skipped_update": 0.0}

    def run_with(name, **loop_kwargs):
        cfg = dataclasses.replace(micro(tmp_path / name, format_warmup_steps=1, warmup_batch_size=3,
                                        **loop_kwargs), max_steps=3, output_dir=str(tmp_path / name))
        rows = [(r["loss"], r["grad_norm"]) for r in train(cfg)["log"] if "loss" in r]
        return rows, weights(cfg, trained=True)

    with monkeypatch.context() as m:
        m.setattr(srl.SelfReplay, "collect", lambda self: pytest.fail("replay_coef=0 must not collect a pool"))
        off_rows, off = run_with("off", replay_coef=0.0)
    with monkeypatch.context() as m:
        m.setattr(reflect, "warmup_sft_step", paper_warmup)
        m.setattr(reflect, "grpo_update", paper_grpo)
        paper_rows, paper = run_with("paper")
    on_rows, on = run_with("on")
    assert off_rows == paper_rows and not changed(off, paper)
    assert changed(off, on)


@pytest.mark.parametrize("overrides, match", [
    ({"loop_kwargs": {"replay_coef": -1.0}}, "method 'reflect_retry_reward': replay_coef must be >= 0"),
    ({"loop_kwargs": {"replay_batch": 0}}, "replay_batch must be >= 1"),
    ({"loop_kwargs": {"reflection_tokens": 0}}, "method 'reflect_retry_reward': reflection_tokens must be >= 1"),
    # 16 + 3 tokens cannot hold a 20-token solution (e.g. '9+9=18;9+9+1=19#198' + EOS): long retries would be cut
    ({"loop_kwargs": {"reflection_tokens": 16}}, r"cannot hold the longest expert solution '[0-9+=;#]{19}' "
                                                 r"\+ EOS \(20\); set reflection_tokens >= 17"),
    ({"loop_kwargs": {"warmup_batch_size": 0}}, "warmup_batch_size must be >= 1"),
    ({"loop_kwargs": {"format_warmup_steps": -1}}, "format_warmup_steps must be >= 0"),
    ({"loop_kwargs": {"warmup_learning_rate": 0.0}}, "warmup_learning_rate must be > 0"),
    ({"beta": 0.1}, "keeps no reference model: --beta must be 0"),
    ({"num_generations": 1}, "num_generations must be >= 2"),
])
def test_bad_options_fail_before_training(tmp_path, overrides, match):
    cfg = dataclasses.replace(micro(tmp_path), **overrides)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not os.path.exists(tmp_path / "rrr" / "metrics.jsonl")
