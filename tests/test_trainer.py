"""The reference trainer on a micro config: every preset runs, updates are exact, runs resume."""

import copy
import dataclasses
import json
import os
import random
import signal
import statistics

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train import trainer as trainer_module
from alignops.train.config import TrainConfig, apply_overrides
from alignops.train.presets import PRESETS, make_config
from alignops.train.rollout import generate
from alignops.train.tasks import AdditionTask, addition_steps, make_task
from alignops.train.tokenizer import CharTokenizer
from alignops.train.rewards import RewardModel
from alignops.train.advantages import Context, compute_advantages
from alignops.train.rollout import Scorer, collect_rollouts
from alignops.train.trainer import policy_update, setup, train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)


def micro(method, tmp_path, **kw):
    return make_config(method, {**MICRO, "output_dir": str(tmp_path / method), **kw})


@pytest.fixture
def varied_rewards(monkeypatch):
    """A random micro-policy almost never solves a sum, so every advantage would be 0 and no
    method could move; reward completion length parity instead (signal in most groups)."""
    monkeypatch.setattr(AdditionTask, "reward", lambda self, problem, completion: float(len(completion) % 2))


@pytest.mark.parametrize("method", sorted(m for m, p in PRESETS.items() if not p.loop))  # loops: test_loops*.py
def test_every_preset_runs_and_updates(method, tmp_path, varied_rewards, monkeypatch):
    # DLER scores truncated completions 0 and most 3-token micro completions are truncated: about 1 group
    # in 6 has differing rewards, so its 10 rounds (20 groups) miss the 2 it needs for ~1 seed in 9
    cfg = micro(method, tmp_path, **({"max_num_gen_batches": 40} if method == "dler" else {}))
    task, tok, policy = setup(cfg)
    before = copy.deepcopy(policy.state_dict())
    # each step's rollout, as the trainer hands it to its metrics (the library's function still runs)
    seen = []
    real_metrics = trainer_module.rollout_metrics
    monkeypatch.setattr(trainer_module, "rollout_metrics",
                        lambda rollout, *a, **k: seen.append(rollout) or real_metrics(rollout, *a, **k))
    result = train(cfg)
    rows = [r for r in result["log"] if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    trl_names = {"reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                 "completions/clipped_ratio", "grad_norm"} | ({"entropy"} if method != "gvpo" else set())
    assert trl_names <= set(rows[0]), trl_names - set(rows[0])
    # the logged reward metrics are those of the step's completions, recomputed here from their text
    # (the parity reward above; DLER's truncated completions score its truncation_reward)
    assert len(seen) == 2
    G = cfg.num_generations
    for step, (row, rollout) in enumerate(zip(rows, seen)):
        truncated = rollout.batch.truncated.tolist()
        parity = [float(len(text) % 2) for text in rollout.texts]
        rewards = [cfg.truncation_reward if cfg.truncation_reward is not None and cut else r
                   for r, cut in zip(parity, truncated)]
        groups = [rewards[i:i + G] for i in range(0, len(rewards), G)]
        assert len(rewards) == cfg.num_prompts * G and all(len(g) == G for g in groups), (step, len(rewards))
        want = {"reward": statistics.fmean(rewards), "reward_std": statistics.stdev(rewards),
                "frac_reward_zero_std": sum(len(set(g)) == 1 for g in groups) / len(groups),
                "accuracy": statistics.fmean(parity), "completions/clipped_ratio": statistics.fmean(truncated)}
        for k, v in want.items():
            assert row[k] == pytest.approx(v, abs=2e-6), (method, step, k, row[k], v)
    # what the run wrote: the metric log as returned, and a checkpoint of step 2 of this method
    with open(os.path.join(cfg.resolved_output_dir(), "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f if line.strip()] == result["log"]
    state = ckpt.load_json(os.path.join(cfg.resolved_output_dir(), ckpt.CHECKPOINT_SUBDIR, "state.json"))
    assert state["step"] == 2 and state["config"]["method"] == method
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
    prep = compute_advantages(cfg, rollout, scorer, Context(policy, tok, task, 0.0, None))
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    policy_update(cfg, preset, policy, opt, prep, scorer)
    return policy.state_dict()


@pytest.mark.parametrize("method,agg", [("dapo", "token-mean"), ("grpo", "seq-mean-token-mean"),
                                        ("dr_grpo", "seq-mean-token-sum-norm")])
def test_gradient_accumulation_is_the_same_update(method, agg, tmp_path):
    cfg = micro(method, tmp_path, beta=0.0, agg=agg, dynamic_sampling=False)
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
    assert (cfg.epsilon_high, cfg.beta, cfg.num_generations, cfg.agg) == (0.3, 0.01, 4, "token-mean")
    assert make_config("grpo", {"loss_type": "dr_grpo"}).agg == "seq-mean-token-sum-norm"


def test_kl_loss_type_alias_takes_verls_meaning():
    """--kl_loss_type is verl's name with verl's values: verl's k3 and low_var_kl are both the clamped k3,
    alignops's low_var_kl; --kl_estimator k3 stays alignops's exact k3. (Against verl's own kl_penalty:
    tests/test_integration_verl.py.)"""
    import argparse
    import re

    from alignops.train.config import add_config_arguments

    for verl_name, ours in (("k3", "low_var_kl"), ("low_var_kl", "low_var_kl"), ("kl", "k1"), ("k1", "k1"),
                            ("mse", "k2"), ("k2", "k2"), ("k2+", "k2")):
        assert make_config("grpo", {"kl_loss_type": verl_name}).kl_estimator == ours
    assert make_config("grpo", {"kl_estimator": "k3"}).kl_estimator == "k3"
    assert make_config("simplerl", {"kl-loss-type": "k1"}).kl_estimator == "k1"   # over the preset's low_var_kl
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for argv, want in ((["--kl_loss_type", "k3"], "low_var_kl"), (["--kl_estimator", "k3"], "k3")):
        assert make_config("grpo", vars(parser.parse_args(argv))).kl_estimator == want
    with pytest.raises(ValueError, match="give one"):
        make_config("grpo", vars(parser.parse_args(["--kl_loss_type", "k3", "--kl_estimator", "k3"])))
    for refused in ("abs", "k3+", "full", "nope"):
        with pytest.raises(ValueError, match=re.escape(repr(refused))):
            make_config("grpo", {"kl_loss_type": refused})


# --------------------------------------------------------------------------------------------
# the same math inside a real loop, data policies, the PPO family


def test_backend_parity_torch_vs_fused_cpu(tmp_path, varied_rewards):
    """The same GRPO run with the float reference backend and the fused C++ one: same losses step
    by step (fp32; the rollouts are identical while the parameters agree to rounding)."""
    logs = {}
    for backend in ("torch", "cpu"):
        res = train(micro("grpo", tmp_path, backend=backend, max_steps=4, output_dir=str(tmp_path / backend)))
        logs[backend] = [r for r in res["log"] if "loss" in r]
    assert len(logs["torch"]) == 4
    for a, b in zip(logs["torch"], logs["cpu"]):
        assert a["reward"] == b["reward"]
        for k in ("loss", "pg_loss", "kl", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a["step"])


_HEAD_RUN = dict(max_steps=2, learning_rate=1e-2, warmup_steps=1, num_iterations=2, num_mini_batches=2,
                 value_pretrain_steps=0, eval_samples=0, temperature=0.9)


@pytest.fixture
def character_rewards(monkeypatch):
    """The parity of the completion's character codes: the random lm_head bias of 'qwen2-bias' makes
    EOS so rare that a whole step's completions can all have the full length, and length parity
    then gives every group equal rewards (no gradient, nothing compared)."""
    monkeypatch.setattr(AdditionTask, "reward", lambda self, problem, completion: float(sum(map(ord, completion)) % 2))


def _with_model(monkeypatch, model):
    """'qwen2-bias': the Qwen2 arch with a random bias on its lm_head; 'llama-tied': lm_head.weight
    is the embedding's parameter."""
    import alignops.train.model as model_module
    from alignops.train import trainer
    if model == "llama-tied":
        real_config = model_module.tiny_config

        def tied(*args, **kwargs):
            config = real_config(*args, **kwargs)
            config.tie_word_embeddings = True
            return config
        monkeypatch.setattr(model_module, "tiny_config", tied)
    elif model == "qwen2-bias":
        real_build = trainer.build_policy

        def with_bias(*args, **kwargs):
            policy = real_build(*args, **kwargs)
            old = policy.lm_head
            head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                head.weight.copy_(old.weight)
                head.bias.copy_(torch.randn(old.out_features, generator=torch.Generator().manual_seed(1)))
            policy.lm_head = head
            return policy
        monkeypatch.setattr(trainer, "build_policy", with_bias)


@pytest.mark.parametrize("method,model", [("grpo", "qwen2-bias"), ("vapo", "llama"), ("gvpo", "llama-tied"),
                                          ("cppo_hit", "llama")])
def test_fused_lm_head_is_the_logits_path(method, model, tmp_path, character_rewards, monkeypatch):
    """fused_lm_head=True (the policy loss and the scorer's log-probs from the decoder's last hidden
    states and the lm_head weight, ao.fused_linear_*) and False (from the logits) train the same
    run: per-step losses, metrics and gradient norms (2 epochs x 2 mini-batches a step, so the
    old and reference log-probs enter) and the final weights agree. The models cover every loss
    hook, a biased head and a head tied to the embedding; the fused run never forms logits of the
    completions (sequence_logits is not called)."""
    from alignops.train import rollout as rollout_module
    from alignops.train import trainer
    _with_model(monkeypatch, model)
    arch = "qwen2" if model.startswith("qwen2") else "llama"
    real_update, real_logits = trainer.policy_update, rollout_module.sequence_logits
    runs = {}
    for fused in (True, False):
        steps, logits_calls = [], []

        def update(*args, **kwargs):
            steps.append(real_update(*args, **kwargs))
            return steps[-1]

        def logits(*args, **kwargs):
            logits_calls.append(1)
            return real_logits(*args, **kwargs)
        monkeypatch.setattr(trainer, "policy_update", update)
        monkeypatch.setattr(rollout_module, "sequence_logits", logits)
        cfg = micro(method, tmp_path, **_HEAD_RUN, arch=arch, fused_lm_head=fused,
                    output_dir=str(tmp_path / f"{method}-{fused}"))
        _, _, policy = setup(cfg)
        head = policy.get_output_embeddings()
        assert (head.bias is not None) == (model == "qwen2-bias")
        assert (head.weight is policy.get_input_embeddings().weight) == (model == "llama-tied")
        train(cfg)
        assert bool(logits_calls) != fused
        runs[fused] = steps, ckpt.load_tensors(cfg.resolved_output_dir(), "model.safetensors")
    (fused_steps, fused_weights), (logit_steps, logit_weights) = runs[True], runs[False]
    assert len(fused_steps) == len(logit_steps) == 2
    for i, (a, b) in enumerate(zip(fused_steps, logit_steps)):
        assert a.keys() == b.keys() and {"loss", "grad_norm"} <= a.keys()
        assert b["grad_norm"] > 1e-3, "a step without gradient would compare nothing"
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (i + 1, k)
    assert fused_weights.keys() == logit_weights.keys()
    start = setup(cfg)[2].state_dict()
    assert any(not torch.allclose(logit_weights[k], start[k]) for k in logit_weights)
    for k in logit_weights:
        if k.endswith("k_proj.bias"):  # gradient 0 (softmax ignores a shift): AdamW steps by rounding noise
            continue
        torch.testing.assert_close(fused_weights[k], logit_weights[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("config_name,transform", [("Gemma2Config", {"final_logit_softcapping": 0.5, "head_dim": 16}),
                                                   ("CohereConfig", {"logit_scale": 3.0}),
                                                   ("GraniteConfig", {"logits_scaling": 0.25})])
def test_fused_lm_head_applies_the_models_logit_transform(config_name, transform):
    """--model checkpoints whose forward transforms the logits (Gemma-2's soft-capping, Cohere's
    scale, Granite's 1 / logits_scaling; Cohere's head is tied): the hidden-states path gives the
    logits path's log-probs and parameter gradients (tiny random models of those architectures)."""
    import transformers
    from alignops.train.rollout import Batch, sequence_head
    config = getattr(transformers, config_name)(
        vocab_size=29, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=2, bos_token_id=1,
        **transform)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(3, 29, (3, 7))
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    batch = Batch(ids, torch.cat([torch.ones(3, 3, dtype=torch.long), mask.long()], 1), 3, ids[:, 3:], mask,
                  torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool))
    labels = batch.completion_ids.masked_fill(mask == 0, -100)
    got = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        logp, entropy = sequence_head(model, batch, fused).token_logprobs(labels, temperature=0.7, compute_entropy=True)
        (logp.sum() + 0.1 * (entropy * mask).sum()).backward()
        got[fused] = logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[True][1] * mask, got[False][1] * mask, rtol=1e-5, atol=1e-6)
    for n, g in got[False][2].items():
        torch.testing.assert_close(got[True][2][n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def _rollout(cfg, seed=0, reward=None):
    torch.manual_seed(seed)
    task, tok, policy = setup(cfg)
    return collect_rollouts(cfg, task, tok, policy, RewardModel(reward or "accuracy"), random.Random(seed),
                            torch.Generator().manual_seed(seed))


@pytest.fixture
def parity_reward(monkeypatch):
    monkeypatch.setattr(AdditionTask, "reward", lambda self, problem, completion: float(len(completion) % 2))


def test_dynamic_sampling_keeps_exactly_the_varied_groups(tmp_path, parity_reward):
    cfg = micro("dapo", tmp_path, num_prompts=4, overlong_buffer_len=0)
    r = _rollout(cfg)
    g = r.rewards.view(-1, cfg.num_generations)
    assert g.shape[0] == cfg.num_prompts
    assert bool((g.std(-1) > 0).all())
    assert r.metrics["sampling/gen_rounds"] >= 1 and 0 <= r.metrics["sampling/filtered_groups_frac"] < 1
    assert r.batch.input_ids.shape[0] == len(r.problems) == len(r.texts) == r.scores.numel()
    for i in range(0, len(r.problems), cfg.num_generations):  # groups stay whole and aligned
        assert len({p.prompt for p in r.problems[i:i + cfg.num_generations]}) == 1


def test_dynamic_sampling_cap_is_a_clear_error(tmp_path):
    cfg = micro("dapo", tmp_path, max_num_gen_batches=2)  # a random micro-policy never solves a sum
    with pytest.raises(RuntimeError, match="max_num_gen_batches"):
        _rollout(cfg)


def test_gpg_threshold_resampling_fills_with_invalid_groups(tmp_path, parity_reward):
    cfg = micro("gpg", tmp_path, num_prompts=4, min_valid_group_fraction=0.5, max_num_gen_batches=5)
    r = _rollout(cfg)
    g = r.rewards.view(-1, cfg.num_generations)
    assert g.shape[0] == 4 and int((g.std(-1) > 0).sum()) >= 2
    cfg = micro("gpg", tmp_path, num_prompts=4, min_valid_group_fraction=1.0, max_num_gen_batches=1)
    r = _rollout(cfg)  # one round allowed: no refill, whatever came is kept
    assert r.rewards.numel() == 4 * cfg.num_generations and r.metrics["sampling/gen_rounds"] == 1


def test_overlong_shaping_and_truncation_reward(tmp_path, parity_reward):
    cfg = micro("grpo", tmp_path, num_prompts=4, overlong_buffer_len=2, max_completion_length=3)
    r = _rollout(cfg)
    want = r.rewards + ao_overlong(r.batch.lengths, 3, 2)
    torch.testing.assert_close(r.scores, want)
    cfg = micro("dler", tmp_path, num_prompts=4, dynamic_sampling=False, max_completion_length=2)
    r = _rollout(cfg)
    assert bool(r.batch.truncated.any()) and bool((r.rewards[r.batch.truncated] == 0).all())


def ao_overlong(lengths, max_len, buf):
    L = lengths.double()
    return (-((L - (max_len - buf)) / buf).clamp(0, 1)).float()


def _prepare(cfg, rollout, ref=False, critic=False):
    from alignops.train.critic import build_critic
    from alignops.train.model import frozen_copy
    task, tok, policy = setup(cfg)
    c = build_critic(policy) if critic else None
    scorer = Scorer(cfg, policy, frozen_copy(policy) if ref else None, c)
    return compute_advantages(cfg, rollout, scorer, Context(policy, tok, task, cfg.beta, None))


def test_cppo_pruning_keeps_the_largest_advantages(tmp_path, parity_reward):
    import alignops as ao
    cfg = micro("cppo_xmu", tmp_path, num_prompts=3, max_num_gen_batches=1, advantage_kwargs={"pruning_rate": 0.75})
    r = _rollout(cfg)
    r.scores = torch.tensor([1., 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0])  # k = 1 of 4; the all-equal group is dropped
    prep = _prepare(cfg, r)
    full = ao.grpo_advantages(r.scores, group_size=4)
    assert prep.batch.input_ids.shape[0] == 2
    torch.testing.assert_close(prep.data["advantages"], full[[0, 8]])  # R=[1,0,0,0] keeps row 0; a tie keeps the earlier row
    cfg = micro("cppo_xmu", tmp_path, num_prompts=3, max_num_gen_batches=1, advantage_kwargs={"pruning_rate": 0.0})
    prep = _prepare(cfg, r)  # P = 0 (docs/methods.md 2.12b): GRPO, minus the zero-variance group
    torch.testing.assert_close(prep.data["advantages"], torch.cat([full[:4], full[8:]]))


def test_ppo_advantages_are_returns_minus_values_with_lambda_one(tmp_path, parity_reward):
    """GAE(1, 1) without whitening: A_t = R - V_t on every valid token (docs/methods.md 2.3 oracle)."""
    cfg = micro("orz", tmp_path, num_prompts=2, whiten_advantages=False)
    r = _rollout(cfg)
    from alignops.train.critic import build_critic
    from alignops.train.rollout import completion_values
    task, tok, policy = setup(cfg)
    critic = build_critic(policy)
    torch.nn.init.normal_(critic.head.weight, std=0.5)
    scorer = Scorer(cfg, policy, None, critic)
    prep = compute_advantages(cfg, r, scorer, Context(policy, tok, task, 0.0, None))
    m = r.batch.completion_mask > 0
    V = completion_values(critic, r.batch).detach()
    want = (r.scores[:, None] - V)
    torch.testing.assert_close(prep.data["advantages"][m], want[m].to(prep.data["advantages"].dtype))
    torch.testing.assert_close(prep.data["returns"][m], r.scores[:, None].expand_as(m)[m].to(prep.data["returns"].dtype))


def test_kl_in_reward_lowers_ppo_token_rewards(tmp_path, parity_reward):
    cfg = micro("reinforce_pp", tmp_path, num_prompts=2, beta=0.5)
    r = _rollout(cfg)
    task, tok, policy = setup(cfg)
    from alignops.train.model import frozen_copy
    ref = frozen_copy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    import alignops as ao
    scorer = Scorer(cfg, policy, ref, None)
    prep = compute_advantages(cfg, r, scorer, Context(policy, tok, task, 0.5, None))
    old, rl = scorer.old_logp(r.batch), scorer.ref_logp(r.batch)
    want = ao.reinforce_pp_advantages(r.scores, r.batch.completion_mask, old_logp=old, ref_logp=rl, kl_coef=0.5)
    torch.testing.assert_close(prep.data["advantages"], want.advantages)
    assert float(prep.metrics["kl"]) != 0.0


def test_resume_with_critic_and_adaptive_kl(tmp_path, varied_rewards):
    kw = dict(value_pretrain_steps=0)
    straight = train(micro("ppo", tmp_path, max_steps=4, output_dir=str(tmp_path / "a"), **kw))
    train(micro("ppo", tmp_path, max_steps=2, output_dir=str(tmp_path / "b"), **kw))
    resumed = train(micro("ppo", tmp_path, max_steps=4, output_dir=str(tmp_path / "b"), resume=True, **kw))
    key = lambda log: [(r["step"], r.get("loss"), r.get("critic/vf_loss"), r.get("kl_coef"))  # noqa: E731
                       for r in log if "loss" in r]
    assert key(resumed["log"]) == key(straight["log"])
    coefs = [r["kl_coef"] for r in straight["log"] if "kl_coef" in r]
    assert coefs[0] == 0.01 and len(set(coefs)) > 1  # the adaptive controller moved


def test_value_pretraining_moves_only_the_critic(tmp_path, varied_rewards):
    from alignops.train.critic import build_critic, pretrain_critic
    cfg = micro("vc_ppo", tmp_path, value_pretrain_steps=3)
    task, tok, policy = setup(cfg)
    critic = build_critic(policy)
    before_p, before_c = copy.deepcopy(policy.state_dict()), copy.deepcopy(critic.state_dict())
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    out = pretrain_critic(cfg, critic, opt, lambda: collect_rollouts(cfg, task, tok, policy, RewardModel("accuracy"),
                                                                     random.Random(0), torch.Generator().manual_seed(0)))
    assert all(torch.equal(before_p[k], v) for k, v in policy.state_dict().items())
    assert any(not torch.equal(before_c[k], v) for k, v in critic.state_dict().items())
    assert "value_pretrain/vf_loss" in out


def test_gvpo_needs_whole_groups(tmp_path):
    with pytest.raises(ValueError, match="whole groups"):
        train(micro("gvpo", tmp_path, gradient_accumulation_steps=8))


def test_awpo_rule_judge_and_reward_functions():
    from alignops.train import rewards as rw
    task = AdditionTask()
    p = next(q for q in task.train if q.prompt == "37+48=")
    assert rw.arithmetic_work(task, p, "85") == 1.0
    assert rw.arithmetic_work(task, p, "75") == 0.5          # units column right, tens wrong
    assert rw.arithmetic_work(task, p, "185") == 0.5         # both columns right, one extra digit
    assert rw.arithmetic_work(task, p, "x") == 0.0
    assert rw.arithmetic_work(task, p, "7+8=15;3+4=7#75") == 0.5  # the carry was lost in column 2
    model = rw.RewardModel("accuracy,format", "1,0.5")
    totals, metrics = model(task, [p, p], ["85", "x"])
    assert totals == [1.5, 0.0] and metrics == {"rewards/accuracy": 0.5, "rewards/format": 0.5}
    user = rw.RewardModel("alignops.train.rewards:accuracy")
    assert user(task, [p], ["85"])[0] == [1.0]
    with pytest.raises(ValueError, match="reward function"):
        rw.RewardModel("nope")
    with pytest.raises(ValueError, match="reward_weights"):
        rw.RewardModel("accuracy,format", "1")


@pytest.mark.parametrize("method,overrides,match", [
    ("grpo", {"kl_in_reward": True}, "kl_in_reward"),
    ("grpo", {"ref_model": "none"}, "reference model"),
    ("cppo_hit", {"ref_model": "none"}, "reference model"),
    ("grpo", {"value_pretrain_steps": 3}, "critic"),
    ("dapo", {"min_valid_group_fraction": 0.5}, "choose one"),
    ("ppo", {"kl_ctrl": "pid"}, "kl_ctrl"),
    ("dapo", {"overlong_buffer_len": 9}, "overlong_buffer_len"),
    ("dapo", {"num_generations": 1}, "num_generations"),
])
def test_incompatible_knobs_fail_before_training(method, overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train(micro(method, tmp_path, **overrides))


# --------------------------------------------------------------------------------------------
# normalisers: the trainer divides by exactly what the library would (docs/methods.md §00.2)


_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_NORM_MASK = torch.tensor([[1., 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])  # row 1 all-masked


def _library_normalizer(agg, mask, max_len):
    from alignops.layout import Rows, default_normalizer
    valid = mask != 0
    return default_normalizer(agg, valid, Rows(valid.shape, valid.device), max_len, torch.float32)


@pytest.mark.parametrize("agg,want", list(zip(_AGG_MODES, (7.0, 3.0, 3.0, 12.0))))
def test_trainer_normalizers_are_the_librarys(agg, want, tmp_path):
    """Actor and critic normalisers against the library's default on a mask with an empty row
    (never counted), and a micro-batched loss that divides by them equals one library call."""
    import alignops as ao
    from alignops.layout import step_normalizer as normalizer_for  # what the trainer divides the policy loss by
    from alignops.train.critic import critic_agg, critic_normalizer
    from alignops.layout import AGG_MODES
    assert set(_AGG_MODES) == set(AGG_MODES)
    lib = _library_normalizer(agg, _NORM_MASK, 4)
    assert float(lib) == want
    assert float(normalizer_for(agg, _NORM_MASK, 4)) == want
    cfg = micro("ppo", tmp_path, agg=agg, max_completion_length=4)
    assert float(critic_normalizer(cfg, _NORM_MASK)) == want
    assert critic_agg(cfg) == agg and critic_agg(micro("orz", tmp_path)) == "seq-mean-token-mean"
    g = torch.Generator().manual_seed(0)
    logp, adv = -torch.rand(4, 4, generator=g), torch.randn(4, generator=g)
    full = ao.policy_loss(logp, None, adv, _NORM_MASK, method="reinforce", agg=agg, max_len=4).loss
    norm = normalizer_for(agg, _NORM_MASK, 4)
    parts = sum(ao.policy_loss(logp[r], None, adv[r], _NORM_MASK[r], method="reinforce", agg=agg,
                               normalizer=norm).loss for r in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(parts, full)
    v, ret = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    full = ao.value_loss(v, v, ret, _NORM_MASK, agg=agg, max_len=4).loss
    norm = critic_normalizer(cfg, _NORM_MASK)
    parts = sum(ao.value_loss(v[r], v[r], ret[r], _NORM_MASK[r], agg=agg, normalizer=norm).loss
                for r in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(parts, full)


def test_orz_critic_uses_its_own_aggregation_and_normaliser(tmp_path, parity_reward):
    """orz's critic step (micro-batched, through policy_update) has the gradient and vf_loss of one
    library value_loss call with orz's aggregation (seq-mean-token-mean, docs/methods.md §2.3, §3.1) and
    the library's default normaliser from the critic's mask: rows of different lengths and an
    all-masked (truncated, masked out) row."""
    import alignops as ao
    from alignops.train.presets import get_preset
    from alignops.train.critic import build_critic
    from alignops.train.rollout import completion_values
    cfg = micro("orz", tmp_path, num_prompts=2, max_grad_norm=1e9, gradient_accumulation_steps=2,
                mask_truncated_completions=True)
    assert cfg.agg == "seq-mean-token-mean"
    r = _rollout(cfg)
    r.batch.completion_mask[0, 1:] = 0  # length 1
    r.batch.completion_mask[5, 2:] = 0  # length <= 2
    r.batch.truncated = torch.zeros_like(r.batch.truncated)
    r.batch.truncated[2] = True  # all-masked in the loss
    task, tok, policy = setup(cfg)
    critic = build_critic(policy)
    torch.nn.init.normal_(critic.head.weight, std=0.5)
    scorer = Scorer(cfg, policy, None, critic)
    preset = get_preset("orz")
    prep = compute_advantages(cfg, r, scorer, Context(policy, tok, task, 0.0, None))
    critic_opt = torch.optim.SGD(critic.parameters(), lr=0.0)  # the gradient stays, the weights too
    metrics = policy_update(cfg, preset, policy, torch.optim.SGD(policy.parameters(), lr=0.0), prep, scorer,
                            critic, critic_opt)
    got = {n: p.grad.clone() for n, p in critic.named_parameters()}
    critic.zero_grad(set_to_none=True)
    mask = r.batch.completion_mask * (~r.batch.truncated)[:, None]
    lengths = mask.sum(-1)
    assert bool((lengths == 0).any()) and len(set(lengths[lengths > 0].tolist())) > 1
    want = ao.value_loss(completion_values(critic, r.batch), scorer.values(r.batch), prep.data["returns"], mask,
                         cliprange_value=cfg.cliprange_value, agg="seq-mean-token-mean")
    want.loss.backward()
    assert metrics["critic/vf_loss"] == pytest.approx(float(want.loss.detach()), rel=1e-5)
    for n, p in critic.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


# --------------------------------------------------------------------------------------------
# checkpoints survive a crash at any point of a save


_CRASH_RUN = dict(max_steps=3, save_every=1, value_pretrain_steps=0)


def _loss_key(rows):
    return [(r["step"], r.get("loss"), r.get("reward"), r.get("critic/vf_loss"), r.get("kl_coef"))
            for r in rows if "loss" in r]


def _checkpoint_tensors(run_dir):
    from safetensors.torch import load_file
    where = ckpt.locate(str(run_dir))
    names = ckpt.load_json(f"{where}/state.json")["checkpoint_files"]
    return {n: load_file(f"{where}/{n}") for n in names if n.endswith(".safetensors")}


def test_checkpoint_survives_sigkill_at_every_save_step(tmp_path, varied_rewards):
    """A PPO micro run (policy, optimizer, critic and its optimizer, tokenizer, state: six files)
    saving after every step is SIGKILLed right after each step of its first save (no checkpoint
    before it) and of its second (one to replace), in forked children of one driver process
    (tests/checkpoint_crash_driver.py; imports paid once). After each kill the last committed
    checkpoint loads (step 1 before the commit of save 2, step 2 from it on; none before the commit
    of save 1), the leftovers are cleaned, and resuming gives the uninterrupted run's losses and
    final tensors exactly."""
    import subprocess
    import sys
    from pathlib import Path
    overrides = {**MICRO, **_CRASH_RUN}
    spec = {"method": "ppo", "overrides": overrides, "root": str(tmp_path), "saves": [1, 2]}
    import alignops
    driver = Path(__file__).with_name("checkpoint_crash_driver.py")
    root = str(Path(alignops.__file__).resolve().parent.parent)  # the driver imports this alignops
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop(ckpt.KILL_ENV, None)
    proc = subprocess.run([sys.executable, str(driver), json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    finished = [c for c in cases if c["signal"] is None]
    assert [c["save"] for c in finished] == [1, 2] and all(c["exit"] == 0 for c in finished), finished
    straight_dir = finished[-1]["dir"]  # ran to the end: the uninterrupted run
    straight = _loss_key(json.loads(line) for line in open(f"{straight_dir}/metrics.jsonl"))
    assert [s for s, *_ in straight] == [1, 2, 3]
    straight_tensors = _checkpoint_tensors(straight_dir)
    for save in (1, 2):
        killed = [c for c in cases if c["save"] == save and c["signal"] is not None]
        # save 1: six files, directory fsync, commit, parent fsync; save 2 also renames the old
        # checkpoint away and removes it
        assert len(killed) == (9 if save == 1 else 11), [c["stderr"] for c in killed]
        commit = next(c["step"] for c in killed if "(commit)" in c["stderr"])
        for c in killed:
            assert c["signal"] == signal.SIGKILL
            assert f"SIGKILL after save {save} step {c['step']}:" in c["stderr"], c["stderr"][-2000:]
            where = ckpt.locate(c["dir"])
            if save == 1 and c["step"] < commit:
                assert where is None, c
            else:
                want = 1 if save == 1 or c["step"] < commit else 2
                assert ckpt.load_json(f"{where}/state.json")["step"] == want, c
                _, _, model = setup(micro("ppo", tmp_path, **_CRASH_RUN))
                ckpt.load_model_weights(c["dir"], model)  # the last good checkpoint loads
            leftovers = [p.name for p in Path(c["dir"]).iterdir() if ".ckpt-" in p.name]
            assert not leftovers, (c["step"], leftovers)
            resumed = train(micro("ppo", tmp_path, **_CRASH_RUN, output_dir=c["dir"], resume=True))
            assert _loss_key(resumed["log"]) == straight, (save, c["step"])
            got = _checkpoint_tensors(c["dir"])
            assert got.keys() == straight_tensors.keys()
            for name, tensors in straight_tensors.items():
                assert got[name].keys() == tensors.keys()
                for k, v in tensors.items():
                    assert torch.equal(got[name][k], v), (save, c["step"], name, k)


def test_rng_state_round_trip_cpu_and_cuda_paths(monkeypatch):
    """Without CUDA no CUDA state is saved and restoring needs none; with CUDA (faked here, so the
    path runs on CPU) every device's state is saved and restored, through JSON."""
    g, rng = torch.Generator().manual_seed(3), random.Random(3)
    state = json.loads(json.dumps(ckpt.rng_state(g, rng)))
    if not torch.cuda.is_available():
        assert "cuda" not in state
    a = (torch.rand(3), torch.rand(3, generator=g), rng.random())
    ckpt.set_rng_state(state, g, rng)
    assert torch.equal(torch.rand(3), a[0]) and torch.equal(torch.rand(3, generator=g), a[1]) and rng.random() == a[2]

    devices = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    state = json.loads(json.dumps(ckpt.rng_state(g, rng)))
    assert state["cuda"] == [d.tolist() for d in devices]
    ckpt.set_rng_state(state, g, rng)
    assert len(restored) == 2 and all(torch.equal(r, d) for r, d in zip(restored, devices))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA checkpoint on a CPU machine
    with pytest.warns(UserWarning, match="CUDA"):
        ckpt.set_rng_state(state, g, rng)
    assert len(restored) == 2


def test_checkpoint_recovery_and_refusals(tmp_path):
    """The states a crash can leave, built by hand: <path> missing with a whole .ckpt-old (renamed
    back), a stale .ckpt-old and a dead process's .ckpt-tmp-<pid> (deleted), and a save refuses to
    replace a directory holding anything but checkpoint files."""
    cfg = apply_overrides(TrainConfig(), dict(MICRO))
    _, tok, model = setup(cfg)
    path = tmp_path / "ck"
    ckpt.save_checkpoint(str(path), model, state={"step": 1}, tokenizer=tok)
    assert ckpt.is_complete(str(path)) and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    path.rename(tmp_path / "ck.ckpt-old")  # killed between the two renames
    dead = tmp_path / "ck.ckpt-tmp-999999999"  # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    assert ckpt.load_state(str(path))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    import shutil
    shutil.copytree(path, tmp_path / "ck.ckpt-old")  # killed before the old one was removed
    ckpt.save_checkpoint(str(path), model, state={"step": 2}, tokenizer=tok)
    assert ckpt.load_state(str(path))["step"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    (path / "state.json").write_text("{\"step\": 3, \"checkpoint_files\": {\"model.safetensors\": 1}}")
    assert not ckpt.is_complete(str(path)) and not ckpt.is_checkpoint(str(path))  # a size that does not match
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        ckpt.save_checkpoint(str(run), model)
    assert (run / "metrics.jsonl").exists()


def test_metric_log_drops_a_torn_last_row(tmp_path):
    from alignops.train.metrics import MetricLog
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')  # killed mid-append
    log = MetricLog(str(path), resume=True)
    assert log.rows == [{"step": 0}, {"step": 1}]
    log.truncate(1)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'
    path.write_text('{"step": 0}\n{"st\n{"step": 2}\n')  # damage before the end is an error
    with pytest.raises(json.JSONDecodeError):
        MetricLog(str(path), resume=True)


def test_the_progress_bar_keeps_the_latest_held_out_accuracy():
    from alignops.train.trainer import show_progress

    class Bar:
        def set_postfix(self, **kw):
            self.postfix = kw
    bar, shown = Bar(), {}
    show_progress(bar, {"reward": 0.25}, shown)
    assert bar.postfix == {"reward": "0.25", "held_out": "-"}        # nothing evaluated yet
    show_progress(bar, {"reward": 0.5, "eval/accuracy": 0.46}, shown)
    show_progress(bar, {"reward": 0.125}, shown)                      # a step between evaluations
    assert bar.postfix == {"reward": "0.12", "held_out": "0.460"}
