"""The on_policy_distill preset (alignops/train/loops/distill.py): the loss it takes on a batch
against a float64 divergence computed here from the two models' full-vocabulary logits (completion
positions only), with the fused lm_head and with the logits; its gradient against the float64
oracle's; steps on a fixed batch lowering the divergence; the preset end to end, the loss it logs
equal to the oracle on the batch it sampled; the teacher trained once and then loaded from its
cache; bad options and a mismatched or weak cached teacher refused before training."""

import copy
import dataclasses
import json
import os

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train import warmup
from alignops.train.loops import distill
from alignops.train.model import build_policy
from alignops.train.presets import PRESETS, make_config
from alignops.train.rollout import Batch, left_pad
from alignops.train.tasks import make_task
from alignops.train.tokenizer import CharTokenizer
from alignops.train.trainer import train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=3, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)
TEACHER = dict(teacher_hidden_size=64, teacher_num_layers=2, teacher_sft_steps=3)


def micro(tmp_path, name="run", teacher_dir=None, **kw):
    loop_kwargs = {**TEACHER, "teacher_dir": str(teacher_dir or tmp_path / "teacher"), **kw.pop("loop_kwargs", {})}
    return make_config("on_policy_distill", {**MICRO, "output_dir": str(tmp_path / name),
                                             "loop_kwargs": loop_kwargs, **kw})


@pytest.fixture
def perfect_probe(monkeypatch):
    """The teacher's SFT (warmup.sft_warmup) sees every probe at 100 %, so a 3-step micro teacher
    'reaches' its target; records each SFT the loop starts."""
    calls = []
    real = warmup.sft_warmup

    def spy(*args, **kwargs):
        calls.append(kwargs.get("out_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(warmup, "evaluate", lambda *a, **k: 1.0)
    monkeypatch.setattr(warmup, "sft_warmup", spy)
    return calls


def models_and_tok(seed=0):
    task = make_task("add")
    tok = CharTokenizer(task.alphabet)
    student = build_policy(tok.vocab_size, seed=seed, hidden=32, layers=1, heads=1)
    teacher = build_policy(tok.vocab_size, seed=seed + 1, hidden=64, layers=2, heads=2)
    return task, tok, student, teacher


def hand_batch(tok, prompts, completions, junk=5):
    """Prompts left-padded, completions right-padded with a non-pad id (`junk`) that the mask alone
    must keep out of the loss."""
    ids, attn = left_pad([tok.encode(p, bos=True) for p in prompts], tok.pad_token_id, "cpu")
    T = max(len(c) for c in completions)
    cids = torch.full((len(completions), T), junk, dtype=torch.long)
    cmask = torch.zeros(len(completions), T)
    for i, c in enumerate(completions):
        cids[i, :len(c)] = torch.tensor(c)
        cmask[i, :len(c)] = 1.0
    return Batch(torch.cat([ids, cids], 1), torch.cat([attn, cmask.long()], 1), ids.shape[1], cids, cmask,
                 torch.zeros_like(cmask), torch.zeros(len(completions), dtype=torch.bool))


def oracle(student, teacher, batch, divergence="reverse_kl", beta=0.5, temperature=1.0, keep_graph=False):
    """Token-mean divergence in float64 from the full models' logits at the completion positions.
    keep_graph: `student` is already float64 and the result keeps its autograd graph."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def logp(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
        return torch.log_softmax(logits[:, batch.prompt_len - 1:-1] / temperature, -1)

    with torch.no_grad():
        lt = logp(copy.deepcopy(teacher).double())
    with torch.set_grad_enabled(keep_graph):
        ls = logp(student if keep_graph else copy.deepcopy(student).double())
        ps, pt = ls.exp(), lt.exp()
        if divergence == "reverse_kl":
            per = (ps * (ls - lt)).sum(-1)
        elif divergence == "forward_kl":
            per = (pt * (lt - ls)).sum(-1)
        else:
            lm = torch.log(beta * pt + (1 - beta) * ps)
            per = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
        m = batch.completion_mask.double()
        return (per * m).sum() / m.sum()


def a_batch(task, tok):
    # completions of 1, 3 and 2 tokens (the last ends with EOS), padded to 3 with a non-pad id
    c = [tok.encode("7"), tok.encode("123"), tok.encode("4", eos=True)]
    return hand_batch(tok, [task.heldout[i].prompt for i in range(3)], c)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("divergence, beta, temperature", [("reverse_kl", 0.5, 1.0), ("reverse_kl", 0.5, 0.7),
                                                            ("forward_kl", 0.5, 1.0), ("jsd", 0.3, 1.0)])
def test_the_batch_loss_is_the_float64_divergence_of_the_completion_tokens(fused, divergence, beta, temperature):
    task, tok, student, teacher = models_and_tok()
    batch = a_batch(task, tok)
    cfg = make_config("on_policy_distill", {"fused_lm_head": fused, "temperature": temperature})
    out = distill.distill_batch_loss(cfg, student, teacher, batch, divergence, beta)
    want = oracle(student, teacher, batch, divergence, beta, temperature)
    assert abs(float(out.loss) - float(want)) <= 1e-5 * max(1.0, float(want)), (float(out.loss), float(want))
    assert out.losses.shape == batch.completion_mask.shape
    assert float(out.losses[0, 1:].abs().sum()) == 0.0  # padding: no loss at all
    # the gradient reaches the student only, and equals the float64 oracle's
    out.loss.backward()
    ref = copy.deepcopy(student).double()
    for p in ref.parameters():
        p.grad = None
    oracle(ref, teacher, batch, divergence, beta, temperature, keep_graph=True).backward()
    for (name, p), q in zip(student.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_steps_on_a_fixed_batch_lower_the_reverse_kl():
    task, tok, student, teacher = models_and_tok()
    batch = a_batch(task, tok)
    cfg = make_config("on_policy_distill", {})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    before = float(oracle(student, teacher, batch))
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        distill.distill_batch_loss(cfg, student, teacher, batch).loss.backward()
        opt.step()
    after = float(oracle(student, teacher, batch))
    assert after < 0.8 * before, (before, after)


def test_the_preset_runs_logs_the_oracle_loss_and_reuses_its_cached_teacher(tmp_path, perfect_probe, monkeypatch):
    seen = []
    real = distill.distill_batch_loss

    def spy(cfg, student, teacher, batch, *args):
        out = real(cfg, student, teacher, batch, *args)
        seen.append((copy.deepcopy(student), batch, float(out.loss)))
        return out

    monkeypatch.setattr(distill, "distill_batch_loss", spy)
    res = train(micro(tmp_path, "a"))
    assert perfect_probe == [str(tmp_path / "teacher")] and ckpt.is_checkpoint(str(tmp_path / "teacher"))
    info = ckpt.load_state(str(tmp_path / "teacher"))
    assert info["kind"] == "sft_teacher" and info["hidden_size"] == 64 and info["num_layers"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and len(seen) == 2
    teacher = build_policy(seen[0][0].config.vocab_size, hidden=64, layers=2, heads=2)
    ckpt.load_model_weights(str(tmp_path / "teacher"), teacher)
    for (student, batch, loss), row in zip(seen, steps):
        assert batch.input_ids.shape[0] == MICRO["num_prompts"] * MICRO["num_generations"]
        want = float(oracle(student, teacher, batch))
        assert abs(loss - want) <= 1e-5 * max(1.0, want) and abs(row["loss"] - want) <= 2e-6 * max(1.0, want)
        assert row["distill/divergence"] == pytest.approx(row["loss"], abs=2e-6)
        assert 0.0 <= row["accuracy"] <= 1.0 and "grad_norm" in row
    assert "eval/teacher_accuracy" in rows[0] and rows[0]["eval/teacher_accuracy"] == rows[-1]["eval/teacher_accuracy"]
    assert res["steps"] == 2
    # a second run loads the teacher: no second SFT, the same weights
    before = {k: v.clone() for k, v in ckpt.load_tensors(str(tmp_path / "teacher"), "model.safetensors").items()}
    train(micro(tmp_path, "b"))
    assert perfect_probe == [str(tmp_path / "teacher")]
    after = ckpt.load_tensors(str(tmp_path / "teacher"), "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_cached_teacher_of_another_size_is_refused(tmp_path, perfect_probe):
    train(micro(tmp_path, "a"))
    with pytest.raises(ValueError, match="teacher_dir .* holds a checkpoint of sft_teacher .* not the teacher"):
        train(micro(tmp_path, "b", loop_kwargs={"teacher_hidden_size": 96}))
    assert not os.path.exists(tmp_path / "b" / "metrics.jsonl")


def test_a_teacher_below_its_target_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(warmup, "evaluate", lambda *a, **k: 0.0)
    with pytest.raises(ValueError, match="below teacher_target 0.9: delete"):
        train(micro(tmp_path))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.parametrize("overrides, match", [
    ({"loop_kwargs": {"divergence": "kl"}}, "divergence must be one of"),
    ({"loop_kwargs": {"beta": 1.5}}, "beta must lie in"),
    ({"loop_kwargs": {"teacher_hidden_size": 100}}, "teacher_hidden_size must be a multiple of its 3 attention heads"),
    ({"loop_kwargs": {"teacher_target": 0.0}}, "teacher_target must lie in"),
    ({"loop_kwargs": {"K": 0}}, "K must be >= 1"),
    ({"loop_kwargs": {"teacher_sft_steps": "10"}}, "teacher_sft_steps must be <class 'int'>"),
    ({"temperature": 0.0}, "--temperature must be > 0"),
])
def test_bad_options_fail_before_training(tmp_path, overrides, match, perfect_probe):
    cfg = micro(tmp_path)
    cfg = dataclasses.replace(cfg, **{k: ({**cfg.loop_kwargs, **v} if k == "loop_kwargs" else v)
                                      for k, v in overrides.items()})
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_a_checkpoint_student_is_refused(tmp_path, perfect_probe):
    task = make_task("add")
    build_policy(CharTokenizer(task.alphabet).vocab_size, hidden=32, layers=1, heads=1).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="with --model the student is a checkpoint"):
        train(dataclasses.replace(micro(tmp_path), model=str(tmp_path / "hf")))
    assert perfect_probe == [] and not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_the_preset_is_a_non_group_loop_with_reverse_kl_by_default():
    preset = PRESETS["on_policy_distill"]
    assert preset.loop and not preset.group_method
    opts = preset.resolve_loop().Options()
    assert opts.divergence == "reverse_kl" and opts.teacher_hidden_size > make_config("grpo").hidden_size


def test_a_run_resumes_exactly_with_its_teacher_and_refuses_another(tmp_path, perfect_probe):
    straight = train(micro(tmp_path, "a", max_steps=3))
    train(micro(tmp_path, "b", max_steps=2))
    resumed = train(micro(tmp_path, "b", max_steps=3, resume=True))
    assert [r["loss"] for r in straight["log"] if "loss" in r] == [r["loss"] for r in resumed["log"] if "loss" in r]
    with pytest.raises(ValueError, match="resume with the same teacher_dir"):
        train(micro(tmp_path, "b", teacher_dir=tmp_path / "other", max_steps=4, resume=True))
