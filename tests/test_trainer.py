"""The reference trainer on a micro config: every preset runs, updates are exact, runs resume."""

import copy
import dataclasses
import json
import random

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train.config import TrainConfig, apply_overrides
from alignops.train.presets import PRESETS, make_config
from alignops.train.rollout import generate
from alignops.train.tasks import AdditionTask, addition_steps, make_task
from alignops.train.tokenizer import CharTokenizer
from alignops.train.rewards import RewardModel
from alignops.train.trainer import Context, Scorer, collect_rollouts, policy_update, setup, train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)


def micro(method, tmp_path, **kw):
    return make_config(method, {**MICRO, "output_dir": str(tmp_path / method), **kw})


@pytest.fixture
def varied_rewards(monkeypatch):
    """A random micro-policy almost never solves a sum, so every advantage would be 0 and no
    method could move; reward completion length parity instead (signal in most groups)."""
    monkeypatch.setattr(AdditionTask, "reward", lambda self, problem, completion: float(len(completion) % 2))


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_preset_runs_and_updates(method, tmp_path, varied_rewards):
    cfg = micro(method, tmp_path)
    task, tok, policy = setup(cfg)
    before = copy.deepcopy(policy.state_dict())
    result = train(cfg)
    rows = [r for r in result["log"] if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    _, _, after = setup(cfg)
    ckpt.load_model_weights(cfg.resolved_output_dir(), after)
    changed = any(not torch.equal(before[k], v) for k, v in after.state_dict().items())
    assert changed, f"{method}: parameters did not change"


def _one_update(cfg, seed=0):
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    task, tok, policy = setup(cfg)
    from alignops.train.presets import get_preset
    preset = get_preset(cfg.method)
    rollout = collect_rollouts(cfg, task, tok, policy, RewardModel("accuracy"), rng, gen)
    rollout.scores = torch.arange(rollout.scores.numel(), dtype=torch.float32) % 3  # signal in every group
    scorer = Scorer(cfg, policy, None, None)
    prep = preset.prepare(cfg, rollout, scorer, Context(policy, tok, task, 0.0, None))
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    policy_update(cfg, preset, policy, opt, prep, scorer)
    return policy.state_dict()


@pytest.mark.parametrize("method,agg", [("dapo", "token-mean"), ("grpo", "seq-mean-token-mean"),
                                        ("dr_grpo", "seq-mean-token-sum-norm")])
def test_gradient_accumulation_is_the_same_update(method, agg, tmp_path):
    cfg = micro(method, tmp_path, beta=0.0, loss_type=agg, dynamic_sampling=False)
    full = _one_update(cfg)
    acc = _one_update(dataclasses.replace(cfg, gradient_accumulation_steps=4))
    for k in full:
        torch.testing.assert_close(acc[k], full[k], rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(tmp_path, varied_rewards):
    straight = train(micro("dapo", tmp_path, max_steps=4, output_dir=str(tmp_path / "a")))
    train(micro("dapo", tmp_path, max_steps=2, output_dir=str(tmp_path / "b")))
    resumed = train(micro("dapo", tmp_path, max_steps=4, output_dir=str(tmp_path / "b"), resume=True))
    key = lambda log: [(r["step"], r.get("loss"), r.get("reward")) for r in log if "loss" in r]  # noqa: E731
    assert key(resumed["log"]) == key(straight["log"])


def test_sampler_records_behaviour_logprobs_and_truncation():
    cfg = apply_overrides(TrainConfig(), dict(MICRO))
    task, tok, policy = setup(cfg)
    prompts = [tok.encode(p.prompt, bos=True) for p in task.heldout[:6]]
    b = generate(policy, prompts, max_new_tokens=4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 temperature=1.3, generator=torch.Generator().manual_seed(0))
    out = policy(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids())
    logp = torch.log_softmax(out.logits[:, b.prompt_len - 1:-1].float() / 1.3, -1)
    logp = logp.gather(-1, b.completion_ids.unsqueeze(-1)).squeeze(-1) * b.completion_mask
    torch.testing.assert_close(logp, b.behaviour_logp, rtol=1e-4, atol=1e-5)
    has_eos = (b.completion_ids == tok.eos_token_id).any(-1)
    assert torch.equal(b.truncated, ~has_eos)


def test_tasks_are_deterministic_and_verifiable():
    a, b = AdditionTask(), AdditionTask()
    assert a.heldout == b.heldout and a.train[:50] == b.train[:50]
    assert not set(p.prompt for p in a.heldout) & set(p.prompt for p in a.train)
    assert addition_steps(37, 48) == ("7+8=15", "3+4+1=8", "85")
    p = a.heldout[0]
    assert a.reward(p, p.answer) == 1.0 and a.reward(p, p.answer + "1") == 0.0
    assert make_task("add_steps").reward(p, p.expert_completion(with_steps=True)) == 1.0
    r1, r2 = random.Random(3), random.Random(3)
    assert a.sample(r1, 5) == a.sample(r2, 5)


def test_jsonl_task(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}*2=", "answer": str(2 * i)}) for i in range(20)))
    task = make_task(str(path))
    assert len(task.heldout) == 2 and len(task.train) == 18
    tok = CharTokenizer(task.alphabet)
    assert tok.decode(tok.encode("7*2=")) == "7*2="


@pytest.mark.parametrize("overrides,match", [
    ({"num_generations": 1}, "num_generations"),
    ({"no_such_option": 3}, "unknown option"),
    ({"advantage": "nope"}, "advantage"),
])
def test_bad_config_fails_before_training(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cfg = micro("grpo", tmp_path, **overrides)
        train(cfg)


def test_unknown_method_and_missing_base(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        make_config("nope")
    with pytest.raises(ValueError, match="base checkpoint"):
        train(micro("grpo", tmp_path, init_from=str(tmp_path / "missing")))


def test_aliases_map_to_trl_names():
    cfg = make_config("grpo", {"clip_ratio_high": "0.3", "kl_loss_coef": "0.01", "rollout_n": "4",
                               "loss_agg_mode": "token-mean"})
    assert (cfg.epsilon_high, cfg.beta, cfg.num_generations, cfg.loss_type) == (0.3, 0.01, 4, "token-mean")
    assert make_config("grpo", {"loss_type": "dr_grpo"}).loss_type == "seq-mean-token-sum-norm"
