"""TRL 1.16's GRPOTrainer at 2 processes (CPU, gloo) under DDP, FSDP2 and DeepSpeed ZeRO-2/3: stock,
`use_alignops()` and `AlignopsGRPOTrainer` take the same steps (loss, grad norm, every parameter, the lm_head
gradient). SFTTrainer under `use_alignops()` too (FSDP2, ZeRO-3). The ZeRO tests are marked slow (`make test-all`
installs deepspeed and runs them).

ALIGNOPS_TRL_DIST_DEVICE=cuda runs the DDP test on 2 GPUs with nccl instead (bench/gpu.sh's ddp:trl step; skipped
with fewer than 2 GPUs); the others always run on CPU.

Each test launches tests/trl_distributed_driver.py with `python -m torch.distributed.run --standalone
--nproc_per_node 2` (OMP_NUM_THREADS=1); the driver runs the three variants in each rank from one saved
tiny Qwen2 and one seed, and rank 0 writes what both ranks recorded. The stock trainer is the oracle.

Tolerance: relative 1e-5, absolute 1e-6, as tests/test_integration_trl.py. The three runs see the same
data on the same ranks, and reduce their gradients the same way; they differ only in the lm_head's fp32
arithmetic (alignops's GEMM tiles and log-sum-exp against TRL's chunked function), a few ulps (~1e-7
relative) per value, which 3 SGD steps carry to ~1e-6 at most. A lost or unreduced gradient, a rank's
share counted twice or a wrong normaliser moves the numbers by 1e-3 and more.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import require_framework

require_framework("trl", "trl")

from tests import trl_distributed_driver as driver  # noqa: E402

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
RTOL, ATOL = 1e-5, 1e-6
VOCAB, HIDDEN = 42, 32
# dapo (its normaliser divides by the process count), 2 iterations per generation (old log-probs scored
# without gradient, a clipped ratio), 2 micro-batches per step (the loss's backward once per micro-batch),
# a reference model (beta: the k3 KL; the engine wraps or partitions it too), 3 steps
CASE = {"loss_type": "dapo", "num_iterations": 2, "learning_rate": 2.0, "gradient_accumulation_steps": 2,
        "beta": 0.04}
PROMPTS_PER_CALL = 4 * CASE["gradient_accumulation_steps"]
DDP_DEVICE = os.environ.get("ALIGNOPS_TRL_DIST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    driver.build_tiny_model(str(path))
    return str(path)


def _launch(tiny_model, out: Path, parallel: str, case: dict = CASE, device: str = "cpu", trainer: str = "grpo"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "trl_distributed_driver.py"), "--model", tiny_model, "--out", str(out),
           "--parallel", parallel, "--case", json.dumps(case), "--device", device, "--trainer", trainer]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    print(f"{parallel}: 2 ranks x 3 variants in {time.monotonic() - start:.1f} s")
    result = json.loads((out / "result.json").read_text())
    tensors = torch.load(out / "tensors.pt", weights_only=True)
    return result, tensors


def _assert_two_ranks(result, distributed_type, backend="gloo"):
    assert result["world_size"] == 2 and result["backend"] == backend
    ranks = result["ranks"]
    assert len(ranks) == 2
    for variant in driver.VARIANTS:
        rows = [r[variant] for r in ranks]
        assert [r["rank"] for r in rows] == [0, 1]
        assert all(r["world_size"] == 2 and r["distributed_type"] == distributed_type for r in rows), rows
        # each rank scored its own share of every generation batch: different prompts, none missing
        seen = [r["seen_prompts"] for r in rows]
        assert len(seen[0]) == len(seen[1]) >= 2
        for a, b in zip(*seen):
            assert len(a) == len(b) == PROMPTS_PER_CALL and set(a).isdisjoint(b), (a, b)
        # the same shards in every variant (the comparison is of the same data)
        for r in range(2):
            assert ranks[r][variant]["seen_prompts"] == ranks[r]["stock"]["seen_prompts"]


def _assert_same_steps(result, tensors):
    want_logs = result["ranks"][0]["stock"]["logs"]
    want = tensors["stock"]
    assert len(want_logs) == len(want["params"]) == 3
    assert any(w["grad_norm"] > 1e-3 for w in want_logs)
    assert any(w.get("clip_ratio/region_mean", 0) > 0 for w in want_logs), "the second iteration never clipped"
    for rank in range(2):       # the reference model took part
        assert all(w["kl"] > 0 for w in result["ranks"][rank]["stock"]["logs"][1:])
    for variant in driver.VARIANTS[1:]:
        for rank in range(2):
            got_logs = result["ranks"][rank][variant]["logs"]
            assert len(got_logs) == 3
            for step, (g, w) in enumerate(zip(got_logs, result["ranks"][rank]["stock"]["logs"])):
                for key in ("loss", "grad_norm", "entropy", "kl"):
                    assert g[key] == pytest.approx(w[key], rel=RTOL, abs=ATOL), (variant, rank, step, key)
            # what each rank holds of the head's gradient (its shard, or the whole reduced gradient)
            for step, (g, w) in enumerate(zip(result["ranks"][rank][variant]["head_layout"],
                                              result["ranks"][rank]["stock"]["head_layout"])):
                assert g["grad"] == w["grad"] and g["weight"] == w["weight"], (variant, rank, step)
                if w["grad"] is None:     # ZeRO keeps the gradients in its own partitions
                    continue
                for key in ("grad_local_sum", "grad_local_abs_sum"):
                    assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), (variant, rank, step, key)
        got = tensors[variant]
        for step in range(3):
            assert got["params"][step].keys() == want["params"][step].keys()
            for name, w in want["params"][step].items():
                torch.testing.assert_close(got["params"][step][name], w, rtol=RTOL, atol=ATOL,
                                           msg=lambda m, n=name, s=step, v=variant: f"{v} step {s} {n}: {m}")
            if want["head_grads"][step] is None:
                assert got["head_grads"][step] is None
                continue
            torch.testing.assert_close(got["head_grads"][step], want["head_grads"][step], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, s=step, v=variant: f"{v} step {s} lm_head grad: {m}")
    first, last = want["params"][0], want["params"][-1]
    assert max((last[n] - first[n]).abs().max().item() for n in first) > 100 * ATOL, "the parameters barely moved"
    assert want["head_grads"][0] is None or want["head_grads"][0].abs().max() > 1e-3
    # the alignops head served the runs: a function that received the whole head weight (a plain tensor
    # in both modes: FSDP2 unshards the head's unit before TRL reads lm_head.weight), with gradients
    for rank in range(2):
        calls = {v: result["ranks"][rank][v]["calls"] for v in driver.VARIANTS[1:]}
        for variant, cs in calls.items():
            assert cs, (variant, rank)
            assert all(c["weight_type"] != "DTensor" and c["weight_shape"] == [VOCAB, HIDDEN] for c in cs), cs[:3]
        assert any(c["grad"] for c in calls["use_alignops"])
        assert any(c["loss_request"] and c["grad"] for c in calls["alignops_trainer"])


def test_trl_ddp_two_ranks_alignops_equals_stock(tiny_model, tmp_path):
    if DDP_DEVICE not in ("cpu", "cuda"):
        raise ValueError(f"ALIGNOPS_TRL_DIST_DEVICE must be cpu or cuda, got {DDP_DEVICE!r}")
    if DDP_DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"ALIGNOPS_TRL_DIST_DEVICE=cuda needs 2 GPUs, {torch.cuda.device_count()} here")
    result, tensors = _launch(tiny_model, tmp_path, "ddp", device=DDP_DEVICE)
    if DDP_DEVICE == "cuda":
        _assert_two_ranks(result, "MULTI_GPU", backend="nccl")
    else:
        _assert_two_ranks(result, "MULTI_CPU")
    for rank in range(2):
        for variant in driver.VARIANTS:
            r = result["ranks"][rank][variant]
            assert not r["fsdp2"]
            for layout in r["head_layout"]:
                assert layout["weight"]["type"] == "Parameter" and layout["weight"]["local_shape"] == [VOCAB, HIDDEN]
    # DDP: the head's gradient is all-reduced, the same on both ranks
    for variant in driver.VARIANTS:
        for a, b in zip(result["ranks"][0][variant]["head_layout"], result["ranks"][1][variant]["head_layout"]):
            assert a["grad_local_sum"] == pytest.approx(b["grad_local_sum"], rel=1e-6, abs=1e-7)
    _assert_same_steps(result, tensors)


def test_trl_fsdp2_two_ranks_alignops_equals_stock(tiny_model, tmp_path):
    result, tensors = _launch(tiny_model, tmp_path, "fsdp2")
    _assert_two_ranks(result, "FSDP")
    for rank in range(2):
        for variant in driver.VARIANTS:
            r = result["ranks"][rank][variant]
            assert r["fsdp2"] and r["model_class"].startswith("FSDP"), r["model_class"]
            # the lm_head weight and its gradient are row shards: half the vocabulary on each rank
            for layout in r["head_layout"]:
                for t in ("weight", "grad"):
                    assert layout[t]["type"] == "DTensor", layout
                    assert layout[t]["placements"] in (["S(0)"], ["Shard(dim=0)"]), layout
                    assert layout[t]["local_shape"] == [VOCAB // 2, HIDDEN], layout
                    assert layout[t]["global_shape"] == [VOCAB, HIDDEN], layout
    # the two shards of the gradient are different rows (not one rank's copy of the other's)
    for a, b in zip(result["ranks"][0]["stock"]["head_layout"], result["ranks"][1]["stock"]["head_layout"]):
        assert a["grad_local_abs_sum"] != pytest.approx(b["grad_local_abs_sum"], rel=1e-3)
    _assert_same_steps(result, tensors)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["zero2", "zero3"])
def test_trl_deepspeed_two_ranks_alignops_equals_stock(tiny_model, tmp_path, parallel):
    """DeepSpeed on its CPU accelerator (gloo), when deepspeed is installed (it is not a dependency: `make
    test-all` installs it; docs/integrations/trl.md). ZeRO-2 partitions gradients and optimizer state; the
    parameters stay whole. ZeRO-3 partitions every parameter, the lm_head's included, and gathers it around its
    use: TRL gathers the head for its fused function, and AlignopsGRPOTrainer's loss (its gradients taken in that
    gathered forward) reaches the head through the model's output, whose backward hook gathers the head again
    before the gradient is accumulated (alignops/integrations/trl.py, _LossRequest._through_output)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (docs/integrations/trl.md, ZeRO on CPU)")
    result, tensors = _launch(tiny_model, tmp_path, parallel)
    _assert_two_ranks(result, "DEEPSPEED")
    for rank in range(2):
        for variant in driver.VARIANTS:
            for layout in result["ranks"][rank][variant]["head_layout"]:
                assert layout["grad"] is None, layout      # ZeRO keeps the gradients in its own partitions
                if parallel == "zero2":
                    assert layout["weight"]["local_shape"] == [VOCAB, HIDDEN], layout
                    assert "partition_numel" not in layout["weight"], layout
                else:   # this rank's partition: half of the head's 42 x 32 elements
                    assert layout["weight"]["partition_numel"] == VOCAB * HIDDEN // 2, layout
    _assert_same_steps(result, tensors)


@pytest.mark.parametrize("parallel", ["fsdp2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_trl_sft_two_ranks_use_alignops_equals_stock(tiny_model, tmp_path, parallel):
    """SFTTrainer under use_alignops() at 2 processes: its fused head asks for is_top1 (mean_token_accuracy)
    besides log-probs and entropy, with the head sharded (FSDP2) or partitioned (ZeRO-3)."""
    if parallel == "zero3":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (docs/integrations/trl.md, ZeRO on CPU)")
    result, tensors = _launch(tiny_model, tmp_path, parallel, case={}, trainer="sft")
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    want_type = "FSDP" if parallel == "fsdp2" else "DEEPSPEED"
    for rank in range(2):
        stock, ours = (result["ranks"][rank][v] for v in driver.SFT_VARIANTS)
        assert stock["rank"] == ours["rank"] == rank and stock["distributed_type"] == want_type
        assert len(stock["logs"]) == len(ours["logs"]) == 3
        for step, (g, w) in enumerate(zip(ours["logs"], stock["logs"])):
            for key in ("loss", "grad_norm", "entropy"):
                assert g[key] == pytest.approx(w[key], rel=RTOL, abs=ATOL), (rank, step, key)
            assert g["mean_token_accuracy"] == w["mean_token_accuracy"], (rank, step)
        calls = [c for c in ours["calls"] if c["grad"]]
        assert len(calls) == 3 and all(c["outputs"] == ["log_probs", "entropy", "is_top1"] for c in calls), calls
        assert all(c["weight_type"] != "DTensor" and c["weight_shape"] == [VOCAB, HIDDEN] for c in calls), calls
        for layout in ours["head_layout"]:
            if parallel == "fsdp2":
                assert layout["grad"]["type"] == "DTensor" and layout["grad"]["local_shape"] == [VOCAB // 2, HIDDEN]
            else:
                assert layout["weight"]["partition_numel"] == VOCAB * HIDDEN // 2 and layout["grad"] is None
    want, got = tensors["stock"], tensors["use_alignops"]
    for step in range(3):
        for name, w in want["params"][step].items():
            torch.testing.assert_close(got["params"][step][name], w, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")
        if want["head_grads"][step] is not None:
            torch.testing.assert_close(got["head_grads"][step], want["head_grads"][step], rtol=RTOL, atol=ATOL)
    first, last = want["params"][0], want["params"][-1]
    assert max((last[n] - first[n]).abs().max().item() for n in first) > 100 * ATOL, "the parameters barely moved"
