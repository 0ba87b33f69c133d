"""The reference trainer under torchrun: 2 gloo ranks on CPU take the same steps as 1 process on the
same global batch and seed (per-step losses and metrics, the final parameters), a 2-rank run
resumes from its checkpoint, and only rank 0 writes files.

The single-process runs go through the same command line (alignops.train.__main__.main, in this
process, one thread like the ranks); the 2-rank runs through `python -m torch.distributed.run`.
"""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import alignops
from alignops.train import checkpoint as ckpt
from alignops.train import ddp
from alignops.train.__main__ import main as cli_main
from alignops.train.config import validate_distributed
from alignops.train.presets import get_preset, make_config

pytestmark = pytest.mark.distributed

ROOT = Path(alignops.__file__).resolve().parent.parent

# the micro config of tests/test_trainer.py with 4 groups (2 per rank); a reward with signal in most
# groups (completion-length parity: a random micro-policy almost never solves a sum) and a learning
# rate at which every step moves every weight, so a wrong gradient shows in the parameters
MICRO = {"hidden_size": 32, "num_layers": 1, "num_prompts": 4, "num_generations": 4, "max_completion_length": 3,
         "eval_size": 8, "eval_every": 100, "init_from": "none", "progress": "false",
         "reward_funcs": "ddp_test_helpers:length_parity", "learning_rate": 1e-3, "warmup_steps": 1}

# Tolerances. The ranks' forward passes see half the rows, and the gradient is two partial sums
# added by the all-reduce instead of one sum: float32 results differ in the last bits, a few ulps
# (~1e-7 relative) per op, which a few steps of AdamW carry to ~1e-6 in the weights. 1e-5 relative
# leaves a margin over that while a real mistake (a rank's gradient missing, a mean instead of a
# sum, a different normaliser or sample) moves the numbers by 1e-3 and more. The log rounds to 6
# decimals, hence the absolute 2e-6 (two roundings) on metrics; weights get 1e-6 absolute for the
# elements whose AdamW step sits near 0 (a gradient ~0 whose sign is float noise).
RTOL, METRIC_ATOL, WEIGHT_ATOL = 1e-5, 2e-6, 1e-6

HELPERS = '''
    """Test helpers the ranks import: the parity reward, and (sitecustomize) a record of every
    file a rank writes under DDP_TEST_WATCH, through Python's audit hooks."""
'''

REWARD = '''
    def length_parity(task, problem, completion):
        return float(len(completion) % 2)
'''

SITECUSTOMIZE = '''
    import atexit, json, os, sys

    _watch, _record = os.environ.get("DDP_TEST_WATCH"), os.environ.get("DDP_TEST_RECORD")
    _rank = os.environ.get("RANK")
    if _watch and _record and _rank is not None:
        _watch = os.path.realpath(_watch)
        _writes = []
        _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        _EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree",
                   "os.truncate", "os.symlink", "os.link"}

        def _under_watch(path):
            try:
                return os.path.realpath(os.fsdecode(path)).startswith(_watch)
            except (TypeError, ValueError):
                return False  # a file descriptor

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                if (flags or 0) & _WRITE_FLAGS or (mode and any(c in str(mode) for c in "wax+")):
                    if _under_watch(path):
                        _writes.append(["open", os.fsdecode(path)])
            elif event in _EVENTS and args and _under_watch(args[0]):
                _writes.append([event, os.fsdecode(args[0])])

        sys.addaudithook(_hook)

        @atexit.register
        def _dump():
            with open(f"{_record}.rank{_rank}.json", "w") as f:
                json.dump(_writes, f)
'''


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_helpers")
    (d / "ddp_test_helpers.py").write_text(textwrap.dedent(HELPERS) + textwrap.dedent(REWARD))
    (d / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    return d


@pytest.fixture
def one_thread():
    """The ranks run with OMP_NUM_THREADS=1; the in-process run too, so GEMMs split the same way."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _argv(method: str, out_dir: Path, **overrides) -> list[str]:
    args = ["--method", method]
    for k, v in {**MICRO, "output_dir": str(out_dir), **overrides}.items():
        args += [f"--{k}", str(v)]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(helpers, monkeypatch, argv):
    monkeypatch.syspath_prepend(str(helpers))
    sys.modules.pop("ddp_test_helpers", None)
    assert cli_main(argv) == 0


def torchrun(helpers, argv, watch: Path, record: Path, nproc: int = 2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_TEST_WATCH": str(watch), "DDP_TEST_RECORD": str(record),
           "PYTHONPATH": os.pathsep.join([str(helpers), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", ckpt.KILL_ENV):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "alignops.train", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(ROOT), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reports = [line for line in proc.stdout.splitlines() if line.lstrip().startswith('{"method"')]
    assert len(reports) == 1, proc.stdout[-3000:]  # rank 0 alone prints the result
    return proc


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def _weights(out_dir: Path) -> dict:
    return load_file(os.path.join(ckpt.locate(str(out_dir)), "model.safetensors"))


def assert_same_run(got_dir: Path, want_dir: Path, got=None, want=None):
    """The logged rows (`got`/`want`, default: the runs' metrics.jsonl) and the final weights agree."""
    got, want = got or _rows(got_dir), want or _rows(want_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        keys = {k for k in w if k != "time_s"}
        assert keys == {k for k in g if k != "time_s"}, (w["step"], keys ^ set(g))
        for k in sorted(keys):
            assert math.isclose(g[k], w[k], rel_tol=RTOL, abs_tol=METRIC_ATOL), (w["step"], k, g[k], w[k])
    assert any(abs(r.get("loss", 0.0)) > 1e-3 for r in want), "no step had a loss: the test would compare nothing"
    gw, ww = _weights(got_dir), _weights(want_dir)
    assert gw.keys() == ww.keys()
    for k in ww:
        torch.testing.assert_close(gw[k], ww[k], rtol=RTOL, atol=WEIGHT_ATOL, msg=lambda m, k=k: f"{k}: {m}")


def assert_only_rank0_wrote(record: Path, nproc: int = 2):
    writes = {r: json.loads(Path(f"{record}.rank{r}.json").read_text()) for r in range(nproc)}
    assert writes[0], "rank 0 wrote nothing: the audit hook saw no file (the check would be vacuous)"
    for r in range(1, nproc):
        assert writes[r] == [], (r, writes[r][:5])


def test_grpo_two_ranks_equal_one_process_and_resume(tmp_path, helpers, monkeypatch, one_thread):
    """GRPO, 2 mini-batches of 2 micro-batches per step (the ranks' shares of a mini-batch are
    uneven, some empty), 2 steps: the 2-rank run stops after step 1 and resumes from its checkpoint."""
    kw = {"num_mini_batches": 2, "gradient_accumulation_steps": 2, "max_steps": 2}
    single_process(helpers, monkeypatch, _argv("grpo", tmp_path / "one", **kw))
    two = tmp_path / "two"
    torchrun(helpers, _argv("grpo", two, **{**kw, "max_steps": 1}), two, tmp_path / "first")
    assert_only_rank0_wrote(tmp_path / "first")
    torchrun(helpers, _argv("grpo", two, **kw, resume="true"), two, tmp_path / "resumed")
    assert_only_rank0_wrote(tmp_path / "resumed")
    rows = _rows(two)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # the resumed run's first row is the 1-step run's (evaluated at its end); compare the training numbers
    straight = _rows(tmp_path / "one")
    for r in (rows[1], straight[1]):
        for k in [k for k in r if k.startswith("eval/")]:
            r.pop(k)
    assert_same_run(two, tmp_path / "one", rows, straight)
    assert sorted(os.listdir(two)) == sorted(os.listdir(tmp_path / "one")) == ["checkpoint", "curves.png",
                                                                                "metrics.jsonl"]


def test_ppo_two_ranks_equal_one_process(tmp_path, helpers, monkeypatch, one_thread):
    """PPO: advantages whitened over the whole batch (GAE), k1 KL in the reward with the adaptive
    controller (its input, the batch KL, reduced over the ranks), the critic's normaliser and
    gradients reduced too; 2 PPO epochs."""
    kw = {"max_steps": 2, "num_iterations": 2}
    single_process(helpers, monkeypatch, _argv("ppo", tmp_path / "one", **kw))
    torchrun(helpers, _argv("ppo", tmp_path / "two", **kw), tmp_path / "two", tmp_path / "writes")
    assert_only_rank0_wrote(tmp_path / "writes")
    assert_same_run(tmp_path / "two", tmp_path / "one")
    critic_one = load_file(os.path.join(ckpt.locate(str(tmp_path / "one")), "critic.safetensors"))
    critic_two = load_file(os.path.join(ckpt.locate(str(tmp_path / "two")), "critic.safetensors"))
    for k in critic_one:
        torch.testing.assert_close(critic_two[k], critic_one[k], rtol=RTOL, atol=WEIGHT_ATOL)


@pytest.mark.parametrize("method,overrides,match", [
    ("grpo", {"num_prompts": 3}, "multiple of the world size"),
    ("dapo", {}, "dynamic_sampling"),
    ("gpg", {}, "min_valid_group_fraction"),
    ("cppo_xmu", {}, "cppo_xmu"),
    ("bapo", {"gradient_accumulation_steps": 2}, "bapo"),
])
def test_unsupported_options_fail_clearly_on_several_ranks(method, overrides, match):
    cfg = make_config(method, overrides)
    with pytest.raises(ValueError, match=match):
        validate_distributed(cfg, get_preset(method), world_size=2)
    validate_distributed(cfg, get_preset(method), world_size=1)  # one process runs them all


def test_groups_split_evenly_and_collectives_are_identities_alone():
    assert [ddp.group_range(6, ddp.Ranks(rank=r, world_size=3)) for r in range(3)] == [range(0, 2), range(2, 4),
                                                                                       range(4, 6)]
    with pytest.raises(ValueError, match="num_prompts=5"):
        ddp.group_range(5, ddp.Ranks(rank=0, world_size=2))
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(ddp.gather_rows(x, ddp.ALONE), x) and torch.equal(ddp.all_sum(x, ddp.ALONE), x.double())
    assert ddp.init("cpu")[0] == ddp.ALONE  # no WORLD_SIZE here: one process, no process group


def test_a_ranks_share_splits_into_whole_group_micro_batches():
    """Alone, a mini-batch splits into exactly gradient_accumulation_steps micro-batches; a rank's
    share (any number of groups, or none) into at most that many, never splitting a group (GVPO
    compares a group's rows within one loss call)."""
    from alignops.train.trainer import micro_batches
    share = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3, 20, 21, 22, 23])  # 3 groups of 4, permuted order
    parts = micro_batches(share, 2, unit=4)
    assert [p.tolist() for p in parts] == [[8, 9, 10, 11, 0, 1, 2, 3], [20, 21, 22, 23]]
    assert [p.tolist() for p in micro_batches(share[:4], 2, unit=4)] == [[8, 9, 10, 11]]
    assert micro_batches(torch.arange(0), 2, unit=4) == []
    assert [p.tolist() for p in micro_batches(torch.arange(6), 3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="whole groups of 4"):
        micro_batches(torch.arange(6), 2, unit=4)
