"""The SFT warm-up's band search (alignops/train/warmup.py) on a micro model, with a stub probe
evaluator that maps the step to an accuracy, and the time-budget progress bar."""

import io
import json
import os

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train.config import TrainConfig
from alignops.train.evaluate import evaluate
from alignops.train.metrics import progress
from alignops.train.trainer import setup
from alignops.train.warmup import describe, sft_warmup

MICRO = TrainConfig(hidden_size=32, num_layers=1, eval_size=10, progress=False)
FAST = {"batch_size": 4, "warmup_steps": 5, "lr": 1e-3}


@pytest.fixture(autouse=True)
def one_thread():
    """A micro model's ops are too small to split: two threads contending with other work on a
    2-core machine run them several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stub(accuracy_at):
    calls = []

    def probe(model, step):
        calls.append(step)
        return accuracy_at(step)
    probe.calls = calls
    return probe


def weights(out_dir):
    _, _, model = setup(MICRO)
    ckpt.load_model_weights(out_dir, model)
    return model.state_dict()


def fixed_run(tmp_path, steps):
    out = str(tmp_path / f"fixed{steps}")
    info = sft_warmup(MICRO, target_accuracy=None, max_steps=steps, out_dir=out, **FAST)
    assert info["outcome"] == "fixed_steps" and info["steps"] == steps and info["evaluations"] == []
    return weights(out)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_stops_at_first_evaluation_inside_band(tmp_path):
    probe = stub(lambda step: step / 100)
    out = str(tmp_path / "base")
    info = sft_warmup(MICRO, target_accuracy=(0.3, 0.5), max_steps=100, min_steps=15, eval_every=10, out_dir=out,
                      probe_accuracy=probe, **FAST)
    assert probe.calls == [20, 30]  # nothing before min_steps; 0.3 is inside (the band is inclusive)
    assert info["outcome"] == "in_band" and info["steps"] == 30 and info["probe_accuracy"] == 0.3
    assert info["evaluations"] == [[20, 0.2], [30, 0.3]]

    saved = ckpt.load_json(os.path.join(out, "state.json"))
    saved.pop("checkpoint_files")  # the checkpoint protocol's own record
    assert saved == json.loads(json.dumps(info))
    for key, want in (("target_accuracy", [0.3, 0.5]), ("lr", 1e-3), ("probe_size", 200), ("steps", 30)):
        assert saved[key] == want, key
    # the full held-out accuracy is that of the saved weights on cfg.eval_size problems
    task, tok, model = setup(MICRO)
    ckpt.load_model_weights(out, model)
    assert saved["heldout_accuracy"] == evaluate(model, task, tok, MICRO.eval_size, MICRO.max_completion_length)
    assert_same_weights(weights(out), fixed_run(tmp_path, 30))
    assert "30 SFT steps" in describe(saved) and "30-50%" in describe(saved) and "inside the band" in describe(saved)


def test_above_band_rewinds_and_stops_inside(tmp_path):
    probe = stub(lambda step: 0.0 if step < 23 else 0.4 if step < 25 else 0.9)
    out = str(tmp_path / "base")
    info = sft_warmup(MICRO.__class__(**{**vars(MICRO), "progress": True}), max_steps=100, min_steps=0,
                      eval_every=10, out_dir=out, probe_accuracy=probe, **FAST)
    assert probe.calls == [10, 20, 30, 21, 22, 23]  # 30 is above: back to 20, then every step
    assert info["outcome"] == "in_band" and info["steps"] == 23 and info["probe_accuracy"] == 0.4
    # the replay after the rewind is the same training as a straight run (weights, optimiser, data order)
    assert_same_weights(weights(out), fixed_run(tmp_path, 23))


def test_one_step_over_the_band_keeps_the_base_below(tmp_path):
    probe = stub(lambda step: 0.1 if step < 25 else 0.9)
    out = str(tmp_path / "base")
    info = sft_warmup(MICRO, max_steps=100, min_steps=0, eval_every=10, out_dir=out, probe_accuracy=probe, **FAST)
    assert probe.calls == [10, 20, 30, 21, 22, 23, 24, 25]
    assert info["outcome"] == "jumped_over_band" and info["steps"] == 24 and info["probe_accuracy"] == 0.1
    assert ckpt.load_json(os.path.join(out, "state.json"))["steps"] == 24
    assert_same_weights(weights(out), fixed_run(tmp_path, 24))
    assert "jumped over" in describe(info)


def test_first_evaluation_above_band_rewinds_to_the_start(tmp_path):
    probe = stub(lambda step: 0.0 if step < 3 else 0.45 if step == 3 else 0.8)
    info = sft_warmup(MICRO, max_steps=100, min_steps=10, eval_every=5, out_dir=str(tmp_path / "base"),
                      probe_accuracy=probe, **FAST)
    assert probe.calls == [10, 1, 2, 3]  # min_steps was too late: from step 0 again, every step evaluated
    assert info["outcome"] == "in_band" and info["steps"] == 3


def test_step_cap_below_band(tmp_path):
    probe = stub(lambda step: 0.1)
    info = sft_warmup(MICRO, max_steps=15, min_steps=0, eval_every=10, out_dir=str(tmp_path / "base"),
                      probe_accuracy=probe, **FAST)
    assert probe.calls == [10, 15]  # the cap is evaluated too
    assert info["outcome"] == "cap_below_band" and info["steps"] == 15 and info["probe_accuracy"] == 0.1
    assert "step cap" in describe(info)


@pytest.mark.parametrize("kwargs, name", [
    ({"target_accuracy": (0.6, 0.4)}, "target_accuracy"), ({"target_accuracy": (0.2, 1.5)}, "target_accuracy"),
    ({"target_accuracy": (0.3,)}, "target_accuracy"), ({"eval_every": 0}, "eval_every"),
    ({"max_steps": 0}, "max_steps"), ({"lr": 0.0}, "lr"), ({"time_budget_s": -1.0}, "time_budget_s"),
    ({"probe_size": 0}, "probe_size"),
])
def test_bad_arguments_name_themselves(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        sft_warmup(MICRO, out_dir=str(tmp_path / "base"), **kwargs)
    assert not os.path.exists(tmp_path / "base")


def test_describe_a_base_from_before_the_band_search():
    assert describe({"steps": 1200, "heldout_accuracy": 0.492}) == "1200 SFT steps, held-out 49.2%"


def test_time_budget_bar_counts_seconds_not_steps():
    clock = {"s": 0.0}
    buf = io.StringIO()
    bar = progress(range(10**6), True, time_budget_s=120, elapsed_s=lambda: clock["s"], desc="grpo", file=buf,
                   mininterval=0)
    for step in bar:
        clock["s"] += 15.0
        bar.set_postfix(reward="0.50")
        if step == 2:
            break
    del bar
    text = buf.getvalue()
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "45/120 s" in last and "steps=3" in last and "reward=0.50" in last, last
    assert "1000000" not in text and "38%" in last


def test_time_budget_bar_after_resume_and_past_the_budget():
    buf = io.StringIO()
    bar = progress(range(5, 10), True, time_budget_s=60, elapsed_s=lambda: 75.0, initial=5, file=buf, mininterval=0)
    assert list(bar) == [5, 6, 7, 8, 9]
    last = buf.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "60/60 s" in last and "steps=10" in last, last  # the last step may run past the budget


def test_bar_without_budget_counts_steps():
    buf = io.StringIO()
    assert list(progress(range(7), True, file=buf, mininterval=0)) == list(range(7))
    assert "7/7" in buf.getvalue()
    assert progress(range(3), False, time_budget_s=10) == range(3)
    with pytest.raises(ValueError, match="time_budget_s"):
        progress(range(3), True, time_budget_s=0)


def test_cli_sft_flags(tmp_path, capsys):
    from alignops.train.__main__ import main  # noqa: PLC0415
    out = str(tmp_path / "base")
    micro = ["--hidden_size", "32", "--num_layers", "1", "--eval_size", "5", "--progress", "false", "--init_from", out]
    assert main(["sft", "--sft_target", "none", "--sft_steps", "3", *micro]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["outcome"] == "fixed_steps" and info["steps"] == 3 and info["target_accuracy"] is None
    assert ckpt.load_json(os.path.join(out, "state.json"))["steps"] == 3
    for argv in (["sft", "--sft_target", "0.3"], ["sft", "--sft_target", "low,high"], ["--sft_steps", "5"],
                 ["--method", "grpo", "--sft_target", "0.3,0.5"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "sft_" in capsys.readouterr().err, argv
    with pytest.raises(ValueError, match="target_accuracy"):
        main(["sft", "--sft_target", "0.5,0.3", *micro])


def test_time_budget_stops_below_band(tmp_path):
    probe = stub(lambda step: 0.0)
    for target in ((0.3, 0.5), None):
        info = sft_warmup(MICRO, target_accuracy=target, max_steps=10**6, min_steps=0, eval_every=1,
                          time_budget_s=1e-9, out_dir=str(tmp_path / "base"), probe_accuracy=probe, **FAST)
        assert info["outcome"] == "time_budget" and info["steps"] == 1, target
        assert "1 SFT steps" in describe(info) and ("time" in describe(info)), describe(info)
