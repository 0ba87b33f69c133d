"""Preference loops (alignops/train/loops/preference.py, docs/methods.md §2.22-2.24): pair
construction and tie dropping, the judge's format and parsing, DPO's log 2 at policy == reference,
ORPO without a reference, Self-Rewarding's pairs, every preset end to end, resume, bad options."""

import copy
import dataclasses
import math
import os
import random

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train.loops import preference as pref
from alignops.train.loops.base import Run
from alignops.train.presets import make_config
from alignops.train.rollout import GroupSeeds
from alignops.train.tasks import AdditionTask, Problem
from alignops.train.trainer import setup, train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)
SMALL = {"pool_prompts": 8, "batch_pairs": 4, "eval_prompts": 8}
PRESETS = ["dpo", "ipo", "cdpo", "robust_dpo", "orpo", "self_rewarding"]


@pytest.fixture
def varied_rewards(monkeypatch):
    """A random micro-policy almost never solves a sum: reward completion-length parity instead,
    so most prompts have both a 'correct' and an 'incorrect' sample."""
    monkeypatch.setattr(AdditionTask, "reward", lambda self, problem, completion: float(len(completion) % 2))


def micro(method, tmp_path, name=None, overrides=None, **loop_kwargs):
    kw = {**SMALL, **({"judge_warmup_steps": 1, "judge_warmup_batch": 8} if method == "self_rewarding" else {}),
          **loop_kwargs}
    return make_config(method, {**MICRO, "output_dir": str(tmp_path / (name or method)), "loop_kwargs": kw,
                                **(overrides or {})})


def weights_after(cfg):
    _, _, model = setup(cfg)
    ckpt.load_model_weights(cfg.resolved_output_dir(), model)
    return model.state_dict()


# ---- pair construction

def test_build_pairs_first_correct_against_first_incorrect_and_ties_dropped():
    prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
    texts = ["3", "2", "1", "2",      # mixed: first correct "2", first incorrect "3"
             "4", "4", "4", "4",      # all correct: a tie
             "0", "1", "5", "7",      # all incorrect: a tie
             "9", "8", "6", "6"]      # mixed, correct last
    rewards = [0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert pref.build_pairs(prompts, texts, rewards, 4) == [("1+1=", "2", "3"), ("4+4=", "6", "9")]


def test_build_pairs_degenerate_inputs():
    assert pref.build_pairs([], [], [], 4) == []
    assert pref.build_pairs(["1+1="], ["5", "6"], [0.0, 0.0], 2) == []        # no correct sample
    assert pref.build_pairs(["1+1="], ["2", "2"], [1.0, 1.0], 2) == []        # all correct
    assert pref.build_pairs(["1+1="], ["2", "x"], [1.0, 0.5], 2) == []        # partial reward is neither
    with pytest.raises(ValueError, match="group_size"):
        pref.build_pairs(["1+1="], ["2", "3", "4"], [1, 0, 0], 2)


def test_build_pairs_dedupes_and_is_deterministic():
    prompts = ["1+1=", "1+1="]   # the same problem drawn twice
    texts = ["2", "3", "2", "3"]
    rewards = [1, 0, 1, 0]
    assert pref.build_pairs(prompts, texts, rewards, 2) == [("1+1=", "2", "3")]
    assert pref.build_pairs(prompts, texts, rewards, 2) == pref.build_pairs(list(prompts), list(texts), rewards, 2)


def test_best_worst_pairs_drop_equal_scores_unparsable_and_repeats():
    prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
    texts = ["2", "3", "4", "5",
             "4", "1", "7", "8",
             "6", "6", "1", "0",
             "8", "9", "8", "2"]
    scores = [3.0, 5.0, 1.0, 1.0,       # best "3" (5), worst first of the 1s: "4"
              2.0, 2.0, 2.0, 2.0,       # every score equal: dropped
              4.0, 0.0, None, None,     # "6" repeated: its second (0.0) dropped -> one scored text: dropped
              None, 4.0, 0.0, 4.5]      # "8" unparsable first: its repeat's 0.0 counts; best "2", worst "8"
    pairs = pref.best_worst_pairs(prompts, texts, scores, 4)
    assert pairs == [("1+1=", "3", "4"), ("4+4=", "2", "8")]
    by_text = {}
    for p, t, s in zip([p for p in prompts for _ in range(4)], texts, scores):
        if s is not None:
            by_text.setdefault((p, t), s)
    assert all(by_text[(p, c)] > by_text[(p, r)] for p, c, r in pairs)   # §2.24's oracle


def test_best_worst_pairs_all_ties_and_no_parsable_score():
    assert pref.best_worst_pairs(["1+1="], ["2", "3", "4"], [3.0, 3.0, 3.0], 3) == []
    assert pref.best_worst_pairs(["1+1="], ["2", "3"], [None, None], 2) == []
    assert pref.best_worst_pairs([], [], [], 4) == []


# ---- the judge

@pytest.mark.parametrize("text, score", [("0", 0), ("5", 5), ("3;", 3), ("53", 5), ("6", None), ("9", None),
                                         ("", None), ("=4", None), (" 4", None), ("#", None)])
def test_parse_score_reads_the_first_character_0_to_5(text, score):
    assert pref.parse_score(text) == score


def test_average_scores_over_the_parsable_judgements():
    assert pref.average_scores([5, 4, None, None, None, None, 0, 1, 2], 3) == [4.5, None, 1.0]


def test_judge_prompt_uses_only_the_task_alphabet():
    text = pref.judge_prompt("37+45=", "82")
    assert text == "*37+45=82=" and set(text) <= set(AdditionTask.alphabet)


@pytest.mark.parametrize("completion, target", [("82", 5), ("8+", 0), ("", 0), ("83", 3), ("80", 3), ("90", 2),
                                                ("72", 2), ("12", 1)])
def test_judge_targets_from_the_verifier(completion, target):
    problem = Problem("37+45=", "82")
    assert pref.judge_target(AdditionTask(), problem, completion) == target


class ScriptedJudge:
    """Scores every candidate of a prompt the same: no prompt can give a pair."""

    def __init__(self):
        self.calls = 0

    def score(self, prompts, completions):
        self.calls += 1
        return [2.0] * len(prompts)


def test_self_rewarding_with_all_equal_scores_builds_no_pair_and_skips(tmp_path, varied_rewards):
    cfg = micro("self_rewarding", tmp_path, judge_warmup_steps=0)
    task, tok, policy = setup(cfg)
    run = Run(cfg, task, tok, policy, torch.optim.AdamW(policy.parameters()), random.Random(0), GroupSeeds(0, "cpu"),
              None, str(tmp_path))
    judge = ScriptedJudge()
    loop = pref.SelfRewardingLoop(run, pref.SelfRewardingOptions(**cfg.loop_kwargs), judge=judge)
    before = copy.deepcopy(policy.state_dict())
    row = loop.step(0)
    assert judge.calls == 1 and row["pool/pairs"] == 0 and row["skipped_update"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


# ---- ORPO: no reference

def test_orpo_builds_no_reference(tmp_path, varied_rewards, monkeypatch):
    built = []
    original = pref.DPOLoop.with_reference

    def spy(self, pool):
        out = original(self, pool)
        built.append(out.ref_chosen)
        return out
    monkeypatch.setattr(pref.DPOLoop, "with_reference", spy)
    result = train(micro("orpo", tmp_path))
    rows = [r for r in result["log"] if "loss" in r]
    assert built and all(ref is None for ref in built)
    assert all(r["skipped_update"] == 0.0 and math.isfinite(r["loss"]) for r in rows)
    assert "nll_loss" in rows[0] and "log_odds_ratio" in rows[0]
    saved = os.listdir(tmp_path / "orpo" / "checkpoint")
    assert not any("ref" in name for name in saved), saved   # no reference log-probs or weights saved


# ---- every preset end to end

@pytest.mark.parametrize("method", PRESETS)
def test_every_preference_preset_runs_and_updates(method, tmp_path, varied_rewards):
    cfg = micro(method, tmp_path)
    before = copy.deepcopy(setup(cfg)[2].state_dict())
    result = train(cfg)
    rows = [r for r in result["log"] if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and "reward" in r and "grad_norm" in r for r in rows)
    dpo_rows = [r for r in rows if r.get("judge/warmup", 0.0) == 0.0]
    assert dpo_rows and all({"rewards/accuracies", "rewards/margins", "pairs"} <= set(r) for r in dpo_rows)
    # §2.22's oracle: the first DPO step of a pool has policy == reference (h = 0): log 2 for DPO, cDPO and
    # robust DPO whatever epsilon, 1 / (4 tau^2) = 25 for IPO; Self-Rewarding's pool follows its warm-up step
    first = dpo_rows[0]
    assert first["skipped_update"] == 0.0 and first["pairs"] > 0 and first["pool/age"] == 0
    if method != "orpo":
        expected = 1.0 / (4 * 0.1 ** 2) if method == "ipo" else math.log(2.0)
        assert first["loss"] == pytest.approx(expected, rel=1e-5)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # held-out pairs, referenced to the base: at the start the implicit rewards are equal (margin 0, no pair
    # "won"); ORPO's implicit reward is beta x the mean log-prob, not a ratio, so it starts anywhere
    start, end = result["log"][0], result["log"][-1]
    assert start["eval/pairs"] > 0 and {"eval/pref_accuracy", "eval/reward_margin"} <= set(end)
    if method != "orpo":
        assert start["eval/reward_margin"] == pytest.approx(0.0, abs=1e-6) and start["eval/pref_accuracy"] == 0.0
    after = weights_after(cfg)
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{method}: parameters did not change"
    if method == "self_rewarding":
        assert rows[0]["judge/warmup"] == 1.0 and "eval/judge_accuracy" in result["log"][-1]


def test_online_rebuilds_the_pool_and_offline_keeps_it(tmp_path, varied_rewards):
    online = train(micro("dpo", tmp_path, "on", {"max_steps": 4}, iteration_steps=2))
    offline = train(micro("dpo", tmp_path, "off", {"max_steps": 4}, mode="offline", iteration_steps=2))
    iterations = lambda res: [r["pool/iteration"] for r in res["log"] if "loss" in r]  # noqa: E731
    ages = lambda res: [r["pool/age"] for r in res["log"] if "loss" in r]  # noqa: E731
    assert iterations(online) == [1, 1, 2, 2] and ages(online) == [0, 1, 0, 1]
    assert iterations(offline) == [1, 1, 1, 1] and ages(offline) == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["dpo", "self_rewarding"])
def test_resume_continues_exactly(method, tmp_path, varied_rewards):
    straight = train(micro(method, tmp_path, "a", {"max_steps": 4}, iteration_steps=2))
    train(micro(method, tmp_path, "b", {"max_steps": 3}, iteration_steps=2))
    assert ckpt.is_checkpoint(str(tmp_path / "b" / "checkpoint"))
    resumed = train(micro(method, tmp_path, "b", {"max_steps": 4, "resume": True}, iteration_steps=2))
    key = lambda log: [(r["step"], r.get("loss"), r.get("pool/iteration")) for r in log if "loss" in r]  # noqa: E731
    assert key(resumed["log"]) == key(straight["log"]) and len(key(straight["log"])) == 4
    assert resumed["final_eval"].get("eval/pref_accuracy") == straight["final_eval"].get("eval/pref_accuracy")


# ---- bad options fail before training

@pytest.mark.parametrize("method, loop_kwargs, match", [
    ("robust_dpo", {"label_smoothing": 0.6}, "label_smoothing must lie in \\[0, 0.5\\) for loss_type 'robust'"),
    ("cdpo", {"label_smoothing": 0.7}, "label_smoothing must lie in \\[0, 0.5\\]"),
    ("ipo", {"label_smoothing": 0.1}, "label_smoothing is not defined for loss_type 'ipo'"),
    ("dpo", {"mode": "sometimes"}, "mode must be one of"),
    ("dpo", {"loss_type": "kto"}, "loss_type must be one of"),
    ("dpo", {"beta": 0.0}, "beta must be finite and > 0"),
    ("orpo", {"batch_pairs": 0}, "batch_pairs must be >= 1"),
    ("dpo", {"samples_per_prompt": 1}, "samples_per_prompt must be >= 2"),
    ("self_rewarding", {"candidates": 1}, "candidates must be >= 2"),
    ("self_rewarding", {"top_p": 0.0}, "top_p must be in"),
    ("self_rewarding", {"mode": "offline"}, "unknown --loop_kwargs \\['mode'\\]"),
    ("self_rewarding", {"judge": "gpt"}, "judge must be one of"),
    ("dpo", {"rpo_alpha": -1.0}, "rpo_alpha must be finite and >= 0"),
    ("self_rewarding", {"rpo_alpha": float("nan")}, "rpo_alpha must be finite and >= 0"),
])
def test_bad_options_fail_before_training(method, loop_kwargs, match, tmp_path):
    cfg = micro(method, tmp_path, **loop_kwargs)
    with pytest.raises(ValueError, match=f"method '{method}': .*{match}"):
        train(cfg)
    assert not os.path.exists(tmp_path / method / "metrics.jsonl")


def test_verifier_judge_scores_by_hand():
    task = AdditionTask()
    prompt = task.train[0].prompt
    answer = int(task.train[0].answer)
    judge = pref.VerifierJudge(task)
    assert judge.score([prompt] * 4, [str(answer), str(answer + 2), "1+", str(answer + 50)]) == [5.0, 3.0, 0.0, 1.0]


def test_judge_warmup_trains_on_judgements_and_expert_answers(tmp_path):
    cfg = micro("self_rewarding", tmp_path, judge_warmup_batch=3)
    task, tok, policy = setup(cfg)
    run = Run(cfg, task, tok, policy, torch.optim.AdamW(policy.parameters()), random.Random(0), GroupSeeds(0, "cpu"),
              None, str(tmp_path))
    loop = pref.SelfRewardingLoop(run, pref.SelfRewardingOptions(**cfg.loop_kwargs))
    seen = []
    run.sft_step = lambda batch, step: seen.append(batch) or {"loss": 0.0, "grad_norm": 0.0}
    row = loop.step(0)
    assert row["judge/warmup"] == 1.0 and len(seen) == 1
    batch = seen[0]
    prompts = [tok.decode(ids[ids != tok.pad_token_id][1:]) for ids in batch.input_ids[:, :batch.prompt_len]]
    targets = [tok.decode(ids) for ids in batch.completion_ids]
    assert len(prompts) == 9   # 3 greedy answers judged, 3 samples judged, 3 expert answers
    for prompt, target in zip(prompts[:6], targets[:6]):
        assert prompt.startswith("*") and prompt.endswith("=") and target in "012345" and len(target) == 1
        problem = next(p for p in task.train if prompt.startswith("*" + p.prompt))
        assert int(target) == pref.judge_target(task, problem, prompt[1 + len(problem.prompt):-1])
    for prompt, target in zip(prompts[6:], targets[6:]):
        problem = next(p for p in task.train if p.prompt == prompt)
        assert target == problem.answer


def test_self_rewarding_with_the_verifier_judge_pairs_better_over_worse(tmp_path, varied_rewards):
    cfg = micro("self_rewarding", tmp_path, judge="verifier", judge_warmup_steps=0)
    task, tok, policy = setup(cfg)
    run = Run(cfg, task, tok, policy, torch.optim.AdamW(policy.parameters()), random.Random(0), GroupSeeds(0, "cpu"),
              None, str(tmp_path))
    loop = pref.SelfRewardingLoop(run, pref.SelfRewardingOptions(**cfg.loop_kwargs))
    row = loop.step(0)
    assert row["pool/pairs"] > 0 and row["skipped_update"] == 0.0
    oracle = pref.VerifierJudge(task)
    for prompt, chosen, rejected in loop.pool.pairs:
        assert oracle.score([prompt], [chosen])[0] > oracle.score([prompt], [rejected])[0]


# ---- RPO: DPO + NLL of the chosen answers (TRL's rpo_alpha)

def chosen_nll_float64(policy, tok, pairs) -> float:
    """Token-mean NLL of the chosen answers (EOS included), one unpadded float64 forward per pair."""
    model = copy.deepcopy(policy).double().eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, chosen, _ in pairs:
            p, c = tok.encode(prompt, bos=True), tok.encode(chosen, eos=True)
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
            total -= float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).sum())
            tokens += len(c)
    return total / tokens


@pytest.mark.parametrize("method", ["dpo", "self_rewarding"])
def test_rpo_alpha_adds_the_chosen_answers_nll(method, tmp_path):
    cfg = micro(method, tmp_path)
    task, tok, policy = setup(cfg)
    run = Run(cfg, task, tok, policy, torch.optim.AdamW(policy.parameters()), random.Random(0), GroupSeeds(0, "cpu"),
              None, str(tmp_path))
    options = pref.SelfRewardingOptions if method == "self_rewarding" else pref.DPOOptions
    plain = (pref.SelfRewardingLoop if method == "self_rewarding" else pref.DPOLoop)(run, options(**cfg.loop_kwargs))
    rpo = copy.copy(plain)
    rpo.opts = dataclasses.replace(plain.opts, rpo_alpha=1.5)
    # answers of different lengths (one empty: EOS only), so a per-pair instead of a per-token mean would differ
    pairs = [("12+30=", "42", "4"), ("7+5=", "12", "1333"), ("99+99=", "", "198")]
    pool = plain.with_reference(pref.Pool(pairs, 0, 0.0))
    with torch.no_grad():
        base, with_nll = plain.pair_loss(pool, [0, 1, 2]), rpo.pair_loss(pool, [0, 1, 2])
    nll = chosen_nll_float64(policy, tok, pairs)
    assert float(with_nll.metrics["nll_loss"]) == pytest.approx(nll, rel=1e-5)
    assert float(with_nll.loss - base.loss) == pytest.approx(1.5 * nll, rel=1e-5)
    assert float(base.loss) == pytest.approx(math.log(2.0), rel=1e-6) and "nll_loss" not in base.metrics
