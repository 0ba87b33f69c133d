"""The trainer's data-loop methods (alignops/train/loops) as a whole: every loop preset is
registered and resolvable, runs from the CLI, resumes exactly, and rejects bad options before
training. Each family's own behaviour is tested in tests/test_loops_<family>.py."""

import dataclasses
import json
import os

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train.__main__ import main
from alignops.train.loops.base import DataLoop, parse_options
from alignops.train.presets import PRESETS, make_config
from alignops.train.trainer import setup, train
from tests.conftest import checkout_root

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)
LOOPS = sorted(name for name, p in PRESETS.items() if p.loop)


def test_the_survey_has_forty_one_presets_sixteen_of_them_loops():
    assert len(PRESETS) == 41
    assert LOOPS == sorted(["cdpo", "chord_mu", "chord_phi", "dft", "dpo", "ipo", "iw_sft", "on_policy_distill", "orpo",
                            "raft", "rahf", "reflect_retry_reward", "robust_dpo", "self_rewarding", "srl",
                            "training_free_grpo"])


@pytest.mark.parametrize("method", LOOPS)
def test_every_loop_preset_resolves_to_a_dataloop_with_checked_options(method):
    preset = PRESETS[method]
    cls = preset.resolve_loop()
    assert issubclass(cls, DataLoop) and dataclasses.is_dataclass(cls.Options)
    parse_options(cls, make_config(method).loop_kwargs, method)  # the preset's own options are valid
    with pytest.raises(ValueError, match=f"method '{method}': unknown --loop_kwargs \\['no_such_option'\\]"):
        parse_options(cls, {"no_such_option": 1}, method)


def test_a_loop_runs_from_the_cli_and_writes_the_run(tmp_path, capsys):
    out = tmp_path / "dft"
    flags = [f"--{k}={v}" for k, v in MICRO.items()]
    assert main(["--method", "dft", *flags, f"--output_dir={out}", "--loop_kwargs", '{"batch_size": 8}']) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["method"] == "dft" and result["steps"] == 2
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert 8 * 2 <= rows[1]["sft/tokens"] <= 8 * 4  # 8 answers of 1-3 digits (sums below 199), each + EOS
    assert os.path.exists(out / "curves.png") and ckpt.is_checkpoint(str(out / "checkpoint"))


def test_a_loop_resumes_exactly(tmp_path):
    straight = train(make_config("dft", {**MICRO, "max_steps": 4, "output_dir": str(tmp_path / "a")}))
    train(make_config("dft", {**MICRO, "max_steps": 2, "output_dir": str(tmp_path / "b")}))
    resumed = train(make_config("dft", {**MICRO, "max_steps": 4, "output_dir": str(tmp_path / "b"), "resume": True}))
    cfg = make_config("dft", MICRO)
    (_, _, a), (_, _, b) = setup(cfg), setup(cfg)
    ckpt.load_model_weights(str(tmp_path / "a"), a)
    ckpt.load_model_weights(str(tmp_path / "b"), b)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert [r["loss"] for r in straight["log"] if "loss" in r] == [r["loss"] for r in resumed["log"] if "loss" in r]


def test_loop_kwargs_merge_into_the_presets():
    cfg = make_config("ipo", {"loop_kwargs": '{"beta": 0.2}'})
    assert cfg.loop_kwargs == {"loss_type": "ipo", "beta": 0.2}


@pytest.mark.parametrize("method, overrides, match", [
    ("dft", {"loop_kwargs": {"batch_size": "8"}}, "batch_size must be <class 'int'>"),
    ("dft", {"loop_kwargs": {"batch_size": 0}}, "method 'dft': batch_size must be >= 1"),
    ("grpo", {"loop_kwargs": {"batch_size": 8}}, "--loop_kwargs sets the options of a data-loop method"),
    ("dft", {"max_completion_length": 0}, "--max_completion_length must be >= 1"),
    ("dpo", {"num_generations": 1}, "num_generations must be >= 2"),
])
def test_bad_loop_configuration_fails_before_training(method, overrides, match, tmp_path):
    cfg = make_config(method, {**MICRO, "output_dir": str(tmp_path / method)})
    cfg = dataclasses.replace(cfg, **{k: ({**cfg.loop_kwargs, **v} if k == "loop_kwargs" else v)
                                      for k, v in overrides.items()})
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not os.path.exists(tmp_path / method / "metrics.jsonl")


def test_a_loop_refuses_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="runs in one process"):
        train(make_config("dft", {**MICRO, "output_dir": str(tmp_path)}))


def test_the_trainer_doc_lists_every_preset_with_a_line():
    doc = (checkout_root() / "docs" / "trainer.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in doc.splitlines()
            if line.startswith("| `") and line.count("|") >= 3}
    assert set(PRESETS) <= rows, sorted(set(PRESETS) - rows)
