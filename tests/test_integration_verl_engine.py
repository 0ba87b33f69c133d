"""verl 0.9.1's actor training path at 2 CPU ranks (gloo): stock policy losses against `alignops_<method>`.

tests/verl_engine_driver.py runs under torch.distributed.run with 2 processes, each rank with its own
half of an 8-row mini-batch in 2 micro-batches. Two runs:

- "packed": verl's TrainingWorker.train_mini_batch (what ActorRolloutRefWorker.update_actor runs)
  over FSDPEngineWithLMHead with FSDP2 across both ranks: verl's mini-batch iterator, train_batch,
  the engine's forward_backward_batch (the global token count all-reduced into batch_num_tokens,
  ppo_loss per micro-batch with global_batch_info), backward, FSDP2's gradient reduce-scatter and
  optimizer_step's clip (a no-op at this bound: the gradients are read at the step). verl's packed
  path (use_remove_padding, its default). Every case, and two of them again on verl's fused forward
  (use_fused_kernels, torch backend) with the lm_head a Shard(0) DTensor across the ranks, stock and
  after alignops.integrations.verl.install_fused_forward().
- "padded": FSDPEngineWithLMHead.forward_backward_batch called directly (each micro-batch's loss
  seen), verl's padded path (use_remove_padding=False), two cases.

Each case runs with verl's loss_mode and with `alignops_<method>`. A float64 single-process oracle
of the whole global batch (verl's stock loss over all 8 rows with dp_size 1) gives the loss, the
gradient and its norm the 2 ranks must reach together.

Tolerances. The engine runs the model in float32; its gradients are held to the float64 oracle
within 64 ulps (float32 eps) of each parameter gradient's largest entry: verl's own stock run needs
up to ~25 on this 2-layer model (attention, RMSNorm and a 61-way softmax, forward and backward),
and alignops is held to the same bound. A reduction or normalisation mistake (a rank's gradient not
reduced, dp_size or the global token count not applied) is off by a large fraction of the gradient,
millions of ulps: the negative control (the gradient without rank 1's rows) checks that the bound
tells them apart. alignops against verl on the same engine: within 8 ulps (the policy loss alone
agrees to the bit here; the fused forward's vocabulary sums round differently by a few ulps). Losses
and the gradient norm, float32 results, at torch's float32 tolerances.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import require_framework

require_framework("verl", "verl")

from tests.verl_engine_driver import CASES, FUSED_CASES, N_ROWS, VOCAB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPS = torch.finfo(torch.float32).eps
ORACLE_ULPS = 64
PAIR_ULPS = 8
# the engine's losses and gradient norm are float32 results: torch's float32 tolerances
F32 = {"rtol": 1.3e-6, "atol": 1e-5}
KEYS = [c[0] for c in CASES] + [c + "+fused" for c in FUSED_CASES]


# "packed": through verl's TrainingWorker.train_mini_batch (what ActorRolloutRefWorker.update_actor
# runs) on verl's packed path (use_remove_padding, its default: each micro-batch one packed row, sdpa
# attention kept to each sequence by its position_ids), every case and the fused forward.
# "padded": FSDPEngineWithLMHead.forward_backward_batch directly (each micro-batch's loss seen) on
# the padded path (use_remove_padding=False: padded rows, an attention mask), two cases.
RUNS = {"packed": ["--worker", "--fused"], "padded": ["--padded", "--cases", "vanilla,dr_grpo"]}
RUN_KEYS = {"packed": KEYS, "padded": ["vanilla", "dr_grpo"]}
PARAMS = [(path, key) for path, keys in RUN_KEYS.items() for key in keys]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in ("VERL_USE_EXTERNAL_PLUGINS", "ALIGNOPS_VERL_FUSED_FORWARD"):
        env.pop(k, None)
    done = {}
    for path, extra in RUNS.items():
        out = tmp_path_factory.mktemp("verl_engine_" + path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "verl_engine_driver.py"), "--out", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT), env=env)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
        result = json.loads((out / "result.json").read_text())
        assert result["use_remove_padding"] == (path == "packed")
        done[path] = result, torch.load(out / "tensors.pt")
    return done


def ulps_off(got, ref, scale):
    """max over parameters of |got - ref| in float32 ulps of the largest entry of that parameter's
    oracle gradient (`scale`)"""
    return max(float((got[k].double() - ref[k].double()).abs().max() / scale[k].abs().max()) / EPS
               for k in scale)


@pytest.mark.parametrize("path", RUNS)
def test_two_ranks_each_with_its_own_rows(runs, path):
    result, _ = runs[path]
    assert result["world"] == 2
    for key in RUN_KEYS[path]:
        for variant in ("stock", "alignops"):
            ranks = result["cases"][key][variant]
            assert len(ranks) == 2
            assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == list(range(N_ROWS))
            assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])
            assert ranks[0]["input_ids_sum"] != ranks[1]["input_ids_sum"]
            assert ranks[0]["local_tokens"] != ranks[1]["local_tokens"]
            for r in ranks:
                assert r["micro_batches"] == 2
                # verl's all-reduced count and dp_size reached the policy loss on every rank
                assert r["gbi"]["dp_size"] == 2
                assert r["gbi"]["batch_num_tokens"] == ranks[0]["local_tokens"] + ranks[1]["local_tokens"]
                assert r["gbi"]["global_batch_size"] == N_ROWS


@pytest.mark.parametrize("path,key", PARAMS)
def test_alignops_equals_verl_in_the_engine(runs, path, key):
    result, tensors = runs[path]
    rec = result["cases"][key]
    stock, ours = rec["stock"], rec["alignops"]
    assert all(r["mode"] == ("worker" if path == "packed" else "engine") for r in stock + ours)
    # the PPO/CISPO clip is active somewhere in the batch
    assert any(c > 0 for r in stock for c in r["clipfrac"])
    for s, a in zip(stock, ours):
        torch.testing.assert_close(torch.tensor(a["pg_loss"]), torch.tensor(s["pg_loss"]))
    oracle_loss = torch.tensor(rec["oracle_loss"], dtype=torch.float64)
    if path == "packed":
        # verl's own mini-batch metrics (aggregated over micro-batches and ranks by verl): the loss is
        # the global batch's, the gradient norm the norm of the global gradient
        for r in stock + ours:
            torch.testing.assert_close(torch.tensor(r["loss"], dtype=torch.float64), oracle_loss, **F32)
            torch.testing.assert_close(torch.tensor(r["grad_norm"], dtype=torch.float64),
                                       torch.tensor(rec["oracle_grad_norm"], dtype=torch.float64), **F32)
    else:
        for s, a in zip(stock, ours):
            torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(s["losses"]))
        # each micro-batch's loss is its share of the global loss times dp_size (verl's convention,
        # the gradients being averaged over the ranks): summed over ranks and halved, the oracle's
        for variant in (stock, ours):
            total = sum(sum(r["losses"]) for r in variant) / 2
            torch.testing.assert_close(torch.tensor(total, dtype=torch.float64), oracle_loss, **F32)
    truth = tensors[(key, "oracle")]
    assert ulps_off(tensors[(key, "stock")], truth, truth) <= ORACLE_ULPS
    assert ulps_off(tensors[(key, "alignops")], truth, truth) <= ORACLE_ULPS
    assert ulps_off(tensors[(key, "alignops")], tensors[(key, "stock")], truth) <= PAIR_ULPS


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_forward_ran_with_the_lm_head_sharded(runs, case):
    result, _ = runs["packed"]
    rec = result["cases"][case + "+fused"]
    for variant, cls in (("stock", "verl.utils.experimental.torch_functional.FusedLinearForPPO"),
                         ("alignops", "alignops.integrations.verl.AlignopsFusedLinearForPPO")):
        ranks = rec[variant]
        for r in ranks:
            assert r["forward"] == "forward_with_torch_backend"
            assert r["fused_class"] == cls
            assert r["head_param"] == "DTensor" and r["head_placements"] == "(Shard(dim=0),)"
        # each rank holds part of the vocabulary rows
        assert ranks[0]["head_local_shape"][0] + ranks[1]["head_local_shape"][0] == VOCAB
        assert 0 < ranks[0]["head_local_shape"][0] < VOCAB
    for r in result["cases"][case]["stock"]:
        assert r["forward"] != "forward_with_torch_backend"


@pytest.mark.parametrize("path", RUNS)
def test_the_bound_tells_a_lost_rank_apart(runs, path):
    """The gradient without rank 1's rows (counts unchanged) is millions of ulps from the oracle:
    the 64-ulp bound would catch a rank whose gradient was not reduced."""
    _, tensors = runs[path]
    truth = tensors[("vanilla", "oracle")]
    lost = tensors[("vanilla", "oracle_rank0_rows")]
    assert ulps_off(lost, truth, truth) > 1000 * ORACLE_ULPS
    assert ulps_off(tensors[("vanilla", "stock")], lost, truth) > 1000 * ORACLE_ULPS
