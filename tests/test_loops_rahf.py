"""RAHF (alignops/train/loops/rahf.py): the loss is exactly zero at alpha = 0 with a fresh LoRA,
the adapter is a real peft LoRA, the directions are the hidden-state differences under the two
instructions (recomputed row by row, unpadded), the saved policy is the merged adapter, both
variants train end to end and resume exactly, and bad options fail before training."""

import copy
import os
import random

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer

from alignops.train import checkpoint as ckpt
from alignops.train.loops.base import Run, parse_options
from alignops.train.loops.rahf import RAHFLoop, wrong_answer
from alignops.train.presets import make_config
from alignops.train.rollout import GroupSeeds
from alignops.train.trainer import setup, train

MICRO = dict(hidden_size=32, num_layers=2, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2,
             eval_samples=0)


def make_loop(tmp_path, **opts):
    # the options' own defaults (SCIT, alpha 5), not the preset's Dual at alpha 1, unless a test says otherwise
    cfg = make_config("rahf", {**MICRO, "output_dir": str(tmp_path),
                               "loop_kwargs": {"batch_size": 4, "variant": "scit", "alpha": 5.0, **opts}})
    task, tok, policy = setup(cfg)
    run = Run(cfg, task, tok, policy, torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate),
              random.Random(0), GroupSeeds(0), None, str(tmp_path))
    return RAHFLoop(run, parse_options(RAHFLoop, cfg.loop_kwargs, "rahf"))


@pytest.mark.parametrize("variant", ["scit", "dual"])
def test_loss_is_exactly_zero_at_alpha_zero_with_a_fresh_lora(tmp_path, variant):
    loop = make_loop(tmp_path, variant=variant, alpha=0.0, stage1_steps=0)
    if variant == "dual":  # two different copies, so v != 0
        with torch.no_grad():
            for p in loop.bad.parameters():
                p.add_(0.05 * torch.randn_like(p))
    prompts, responses = ["37+45=", "1+2=", "99+99="], ["82", "4", "198"]
    out, _ = loop.stage2_loss(prompts, responses)
    assert out.loss.item() == 0.0 and torch.all(out.losses == 0)
    out.loss.backward()  # a zero gradient at the starting point (every distance is 0: no direction)
    grads = {n: p.grad for n, p in loop.peft.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values()), \
        {n: g.abs().max().item() for n, g in grads.items() if g.any()}
    # the same loss is not zero once alpha > 0 (v != 0) or once the LoRA has moved
    loop.opts.alpha = 5.0
    assert loop.stage2_loss(prompts, responses)[0].loss.item() > 0
    loop.opts.alpha = 0.0
    with torch.no_grad():
        for name, p in loop.peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    assert loop.stage2_loss(prompts, responses)[0].loss.item() > 0


def test_the_adapter_is_a_peft_lora_and_only_its_parameters_train(tmp_path):
    loop = make_loop(tmp_path, layers=[1], stage1_steps=0)
    assert isinstance(loop.peft, peft.PeftModel)
    lora_modules = {n for n, m in loop.peft.named_modules() if isinstance(m, LoraLayer)}
    # layers=[1] is block 0's output: LoRA on block 0's q_proj and v_proj only
    assert sorted(n.split("model.layers.")[1] for n in lora_modules) == ["0.self_attn.q_proj", "0.self_attn.v_proj"]
    cfg = loop.peft.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16.0, 0.05)
    trainable = [n for n, p in loop.peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for g in loop.lora_opt.param_groups for p in g["params"]} == \
           {id(p) for p in loop.peft.parameters() if p.requires_grad}
    assert not any(isinstance(m, LoraLayer) for m in loop.run.policy.modules())  # the policy stays plain


def unpadded_hidden(model, tok, prompt, response, layer):
    """hidden_states[layer] at the positions predicting response + EOS, one row, no padding."""
    ids = tok.encode(prompt, bos=True) + tok.encode(response, eos=True)
    n = len(tok.encode(response, eos=True))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0, -n - 1:-1].double()


@pytest.mark.parametrize("variant", ["scit", "dual"])
def test_directions_are_the_hidden_state_differences(tmp_path, variant):
    loop = make_loop(tmp_path, variant=variant, stage1_steps=0)
    if variant == "dual":  # make the two copies differ
        with torch.no_grad():
            for p in loop.bad.parameters():
                p.add_(0.05 * torch.randn_like(p))
    prompts, responses = ["37+45=", "1+2=", "9+9="], ["82", "3", "18"]
    v, mask = loop.directions(prompts, responses)
    assert v.shape[:2] == (2, 3) and mask.shape == v.shape[1:3]
    tok = loop.run.tok
    for li, layer in enumerate([1, 2]):
        for b, (x, y) in enumerate(zip(prompts, responses)):
            if variant == "scit":
                want = (unpadded_hidden(loop.run.policy, tok, "++ " + x, y, layer)
                        - unpadded_hidden(loop.run.policy, tok, "-- " + x, y, layer))
            else:
                want = unpadded_hidden(loop.good, tok, x, y, layer) - unpadded_hidden(loop.bad, tok, x, y, layer)
            n = len(y) + 1
            assert mask[b].sum() == n and mask[b, n:].sum() == 0
            assert want.abs().max() > 1e-3  # the instructions do change the hidden states
            torch.testing.assert_close(v[li, b, :n].double(), want, atol=2e-5, rtol=1e-4)


def test_the_policy_holds_the_merged_adapter(tmp_path):
    loop = make_loop(tmp_path, stage1_steps=0)
    before = copy.deepcopy(loop.run.policy.state_dict())
    loop.step(0), loop.step(1)
    merged = copy.deepcopy(loop.peft).merge_and_unload().state_dict()
    after = loop.run.policy.state_dict()
    assert merged.keys() == after.keys()
    for k in after:
        torch.testing.assert_close(after[k], merged[k], atol=1e-6, rtol=0)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_dispreferred_is_the_wrong_sample_or_a_changed_answer(tmp_path):
    loop = make_loop(tmp_path, stage1_steps=0)
    run = loop.run
    run.sample = lambda prompts, n: (None, ["1" + p for p in prompts])  # every sample wrong
    problems, preferred, dispreferred, metrics = loop.pairs(0)
    assert preferred == [p.answer for p in problems] and metrics["reward"] == 0.0
    assert dispreferred == ["1" + p.prompt for p in problems]
    answers = {p.prompt: p.answer for p in run.task.train}
    run.sample = lambda prompts, n: (None, [answers[p] for p in prompts])  # every sample right
    problems, preferred, dispreferred, metrics = loop.pairs(0)
    assert metrics["reward"] == 1.0
    for p, d in zip(problems, dispreferred):
        assert d != p.answer and len(d) == len(p.answer) and set(d) <= set("0123456789")


def test_wrong_answer_changes_one_digit():
    rng = random.Random(0)
    for answer in ["0", "7", "82", "198", "1-2"]:
        for _ in range(20):
            w = wrong_answer(answer, rng)
            assert w != answer and len(w) == len(answer)
            assert sum(a != b for a, b in zip(w, answer)) == 1
    assert wrong_answer("", rng) == "0" and wrong_answer("#", rng) == "#0"  # no digit to change


@pytest.mark.parametrize("variant", ["scit", "dual"])
def test_both_variants_train_end_to_end_and_resume_exactly(tmp_path, variant):
    kw = {"batch_size": 4, "variant": variant, "stage1_steps": 1}
    straight = train(make_config("rahf", {**MICRO, "max_steps": 4, "output_dir": str(tmp_path / "a"),
                                          "loop_kwargs": kw}))
    train(make_config("rahf", {**MICRO, "max_steps": 2, "output_dir": str(tmp_path / "b"), "loop_kwargs": kw}))
    resumed = train(make_config("rahf", {**MICRO, "max_steps": 4, "output_dir": str(tmp_path / "b"),
                                         "loop_kwargs": kw, "resume": True}))
    stages = [r.get("stage") for r in straight["log"] if "stage" in r]
    assert stages == [1, 2, 2, 2]
    assert all(r["rahf/loss"] > 0 and "rahf/layer1" in r and "rahf/layer2" in r and 0 <= r["reward"] <= 1
               for r in straight["log"] if r.get("stage") == 2)
    cfg = make_config("rahf", MICRO)
    (_, _, init), (_, _, a), (_, _, b) = setup(cfg), setup(cfg), setup(cfg)
    ckpt.load_model_weights(str(tmp_path / "a"), a)  # the plain architecture loads the saved weights
    ckpt.load_model_weights(str(tmp_path / "b"), b)
    changed = [k for k, x in a.state_dict().items() if not torch.equal(x, init.state_dict()[k])]
    assert changed
    if variant == "dual":  # Dual's policy only moves through the LoRA (q/v of the blocks)
        assert all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert [r.get("rahf/loss") for r in straight["log"]][-3:] == [r.get("rahf/loss") for r in resumed["log"]][-3:]


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "triple"}, "variant must be one of"),
    ({"layers": [3]}, "layers must be hidden_states indices in \\[1, 2\\]"),
    ({"layers": [0]}, "layers must be a non-empty list of hidden_states indices >= 1"),
    ({"layers": []}, "layers must be a non-empty list"),
    ({"alpha": -1.0}, "alpha must be >= 0"),
    ({"stage1_steps": -1}, "stage1_steps must be >= 0"),
    ({"good_instruction": "good "}, "good_instruction 'good ' uses characters outside"),
    ({"bad_instruction": "++ "}, "two different non-empty strings"),
    ({"lora_targets": ["no_such_proj"]}, "lora_targets \\['no_such_proj'\\]"),
    ({"responses": "all"}, "responses must be one of"),
])
def test_bad_options_fail_before_training(tmp_path, kwargs, match):
    cfg = make_config("rahf", {**MICRO, "output_dir": str(tmp_path / "r"), "loop_kwargs": kwargs})
    with pytest.raises(ValueError, match=f"method 'rahf': .*{match}"):
        train(cfg)
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")
