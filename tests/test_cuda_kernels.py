"""The `cuda` backend of the token-statistics op (csrc/cuda/token_stats.cu) against float64 math.

Without a GPU only the host self-check runs: it compiles csrc/cuda/token_stats_row.cuh (the
per-thread row split, visiting order and math the kernels use) with the host compiler and
simulates every thread of a block (tests/cuda_row_selfcheck.cpp). Everything else is marked `gpu`
and runs wherever a CUDA device and an alignops._C built with nvcc exist.

Error rule as in tests/test_token_logprobs.py (docs/design.md "Tests"): on the same dtype-rounded
inputs, the kernel's error against float64 math may not exceed twice eager torch's error in that
dtype, plus 1e-5 of the output's scale.
"""

import os
import shutil
import subprocess
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import alignops as ao
from alignops import _backend
from alignops.reference.token_stats import token_stats as ref_token_stats
from alignops.logits.kernels import token_stats_op
from tests.conftest import checkout_root
from tests.test_token_logprobs import check_against_oracle, make_labels, make_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
PATTERNS = ["normal", "peaked", "shifted_up", "shifted_down", "neginf"]
MAX_BLOCKS = 65535 * 8  # the grid cap in token_stats.cu


# --------------------------------------------------------------------------------------------
# host self-check (no GPU)


def test_host_selfcheck_of_row_split_and_math(tmp_path):
    """Every element visited once, in-place backward == out-of-place, NaN/-inf handling, values vs
    float64, for V in {1..151936}, 2- and 4-byte elements, every row misalignment, 1..1024 threads."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    root = str(checkout_root())  # compiles csrc/cuda/token_stats_row.cuh, which no wheel carries
    exe = tmp_path / "cuda_row_selfcheck"
    # -ffp-contract=off: the host stands in for __fmul_rn, which nvcc never contracts.
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                            "-I", os.path.join(root, "csrc"), os.path.join(os.path.dirname(__file__), "cuda_row_selfcheck.cpp"),
                            "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failures" in run.stdout


# --------------------------------------------------------------------------------------------
# GPU


@pytest.fixture
def cuda_backend():
    reason = _backend.why_unavailable("cuda", torch.device("cuda"))
    # On a GPU machine an extension without the CUDA kernels is a build failure, not a skip.
    assert reason is None, f"the cuda backend cannot run: {reason}"
    return "cuda"


def oracle_stats(x, labels, temperature, ignore_index=-100):
    """float64 (logp, lse, entropy) of rows of x (any device), computed on the GPU in chunks."""
    outs = [ref_token_stats(x[i:i + 64].double(), labels[i:i + 64], temperature, ignore_index)
            for i in range(0, x.shape[0], 64)]
    return tuple(torch.cat([o[k] for o in outs]) for k in range(3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("v", [1, 7, 4099, 151936])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_matches_oracle(cuda_backend, dtype, v, pattern, temperature):
    """Values and gradients (random upstream a and b) vs float64, ignored rows included."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, v, pattern, temperature)).encode()))
    n = 3 if v > 100000 else 9
    x = make_logits(n, v, dtype, pattern, gen, "cuda")
    labels = make_labels(x, gen, 0.3)
    if v > 1:
        labels[0] = v - 1  # the last column: behind the last full 16-byte vector
    check_against_oracle(x, labels, temperature, cuda_backend, gen=gen)


@pytest.mark.gpu
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6),
       v=st.sampled_from([1, 2, 3, 5, 8, 9, 17, 31, 255, 256, 257, 1031, 4096, 4099, 8209]),
       dtype=st.sampled_from(DTYPES), temperature=st.floats(0.3, 2.0),
       pattern=st.sampled_from(PATTERNS), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
       with_entropy=st.booleans(), column_offset=st.integers(0, 7))
def test_matches_oracle_random(seed, n, v, dtype, temperature, pattern, ignore_frac, with_entropy,
                               column_offset):
    """Random shapes; column_offset slices the vocabulary start so rows begin at every alignment."""
    reason = _backend.why_unavailable("cuda", torch.device("cuda"))
    assert reason is None, reason
    gen = torch.Generator().manual_seed(seed)
    x = make_logits(n, v + column_offset, dtype, pattern, gen, "cuda")[:, column_offset:]
    labels = make_labels(x, gen, ignore_frac)
    check_against_oracle(x, labels, temperature, "cuda", with_entropy=with_entropy, gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("v", [129920, 100003])
def test_real_and_prime_vocab(cuda_backend, dtype, v):
    gen = torch.Generator().manual_seed(v)
    x = make_logits(4, v, dtype, "peaked", gen, "cuda")
    labels = make_labels(x, gen, 0.0)
    labels[1] = v - 1
    check_against_oracle(x, labels, 0.8, cuda_backend, gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["shifted_slice", "row_stride", "vocab_offset", "odd_vocab_3d"])
def test_non_contiguous_layouts(cuda_backend, dtype, layout):
    """Row strides read in place; rows starting off a 16-byte boundary, and a gradient whose rows
    have another alignment than the logits' (the kernel falls back to scalar access there)."""
    gen = torch.Generator().manual_seed(11)
    B, T, V = 3, 6, 4103
    base = make_logits(B * T, V, dtype, "peaked", gen, "cuda").view(B, T, V)
    if layout == "shifted_slice":
        x = base[:, :-1, :]  # what trainers do: logits[:, :-1]
    elif layout == "row_stride":
        x = base.view(B * T, V)[1::2]
    elif layout == "vocab_offset":
        x = base[:, :, 3:]  # unit stride over V, every row misaligned by 3 elements
    else:
        x = base[:, 1:, :-2]  # odd V and odd row starts
    assert not x.is_contiguous()
    labels = make_labels(x, gen, 0.2)
    check_against_oracle(x, labels, 0.9, cuda_backend, gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("v", [7, 4099, 151936])
@pytest.mark.parametrize("offset", [0, 1])
def test_inplace_backward_bitwise(cuda_backend, dtype, v, offset):
    """grad_logits aliasing the logits gives the same bits as a separate output buffer with the
    same layout (offset 1: every row starts off a 16-byte boundary, both ways)."""
    gen = torch.Generator().manual_seed(v + offset)
    n = 5
    base = make_logits(n, v + offset, dtype, "peaked", gen, "cuda")
    x = base[:, offset:].unsqueeze(0)
    labels = make_labels(x[0], gen, 0.2)
    labels[1] = v - 1
    logp, lse, ent = token_stats_op(x, labels, 1.3, -100, True, cuda_backend)
    ga = torch.randn(n, generator=gen).cuda()
    gb = torch.randn(n, generator=gen).cuda()
    kernel = _backend.kernel("token_stats_bwd", cuda_backend)
    expected = torch.full_like(base, float("nan"))[:, offset:].unsqueeze(0)
    kernel(x, labels, logp, lse, ent, ga, gb, 1 / 1.3, -100, True, expected)
    inplace = base.clone()[:, offset:].unsqueeze(0)
    kernel(inplace, labels, logp, lse, ent, ga, gb, 1 / 1.3, -100, True, inplace)
    torch.cuda.synchronize()
    assert torch.equal(inplace, expected)
    assert torch.isfinite(expected).all()
    # and the values themselves: float64 math on the same inputs
    xr = x[0].detach().double().requires_grad_(True)
    rl, _, re = ref_token_stats(xr, labels, 1.3)
    (rl * ga.double() + re * gb.double()).sum().backward()
    scale = (ga.abs() + gb.abs()).max().item() / 1.3
    ulp = 2.0 ** {torch.float32: -23, torch.bfloat16: -8, torch.float16: -10}[dtype]
    err = (expected[0].double() - xr.grad).abs()
    assert (err <= xr.grad.abs() * ulp + 1e-5 * scale).all(), f"max error {err.max().item():.3g}"


@pytest.mark.gpu
def test_ignored_and_out_of_range_rows(cuda_backend):
    """Ignored rows are not read (NaN there changes nothing) and get zeros; a label outside [0, V)
    gives logp NaN and a zero gradient row, with no fault."""
    gen = torch.Generator().manual_seed(12)
    V = 1031
    x = make_logits(6, V, torch.bfloat16, "normal", gen, "cuda").unsqueeze(0)
    x[0, 1] = float("nan")
    x[0, 4] = float("-inf")
    labels = torch.tensor([3, -100, V, -1, -100, 0], device="cuda")
    logp, lse, ent = token_stats_op(x, labels, 1.0, -100, True, cuda_backend)
    for out in (logp, lse, ent):
        assert (out[[1, 4]] == 0).all()
    assert torch.isnan(logp[[2, 3]]).all()
    assert torch.isfinite(lse[[0, 2, 3, 5]]).all() and torch.isfinite(ent[[0, 2, 3, 5]]).all()
    in_range = (labels >= 0) & (labels < V)
    ref_logp, _, _ = oracle_stats(x[0], torch.where(in_range, labels, -100), 1.0)
    ref = ref_logp[[0, 5]]
    torch.testing.assert_close(logp[[0, 5]].double(), ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))
    grad = torch.full_like(x, 5.0)
    ones = torch.ones(6, device="cuda")
    _backend.kernel("token_stats_bwd", cuda_backend)(
        x, labels, logp, lse, ent, ones, ones, 1.0, -100, True, grad)
    assert (grad[0, 1:5] == 0).all()
    assert torch.isfinite(grad[0, [0, 5]]).all() and (grad[0, [0, 5]] != 0).any()


@pytest.mark.gpu
def test_nan_logit_poisons_only_its_row(cuda_backend):
    gen = torch.Generator().manual_seed(13)
    x = make_logits(4, 4099, torch.float32, "neginf", gen, "cuda")
    labels = make_labels(x, gen, 0.0)
    labels[2] = 5
    x[1, 2000] = float("nan")
    x[2, :] = float("-inf")  # an all -inf stretch around a NaN: must not be merged away as empty
    x[2, labels[2]] = 0.0
    x[2, 3000] = float("nan")
    logp, ent = ao.token_logprobs(x, labels, compute_entropy=True, backend=cuda_backend)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1]) and torch.isnan(logp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(logp[[0, 3]]).all() and torch.isfinite(ent[[0, 3]]).all()


@pytest.mark.gpu
def test_deterministic_and_row_independent(cuda_backend):
    gen = torch.Generator().manual_seed(14)
    x = make_logits(64, 151936, torch.bfloat16, "normal", gen, "cuda").requires_grad_(True)
    labels = make_labels(x, gen, 0.1)
    runs = []
    for _ in range(2):
        x.grad = None
        lp, en = ao.token_logprobs(x, labels, compute_entropy=True, backend=cuda_backend)
        (lp.sum() - 0.3 * en.sum()).backward()
        runs.append((lp, en, x.grad.clone()))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    lp1, en1 = ao.token_logprobs(x[37:38].detach(), labels[37:38], compute_entropy=True, backend=cuda_backend)
    assert torch.equal(lp1, runs[0][0][37:38]) and torch.equal(en1, runs[0][1][37:38])


@pytest.mark.gpu
def test_more_rows_than_the_grid(cuda_backend):
    """N beyond the grid cap: blocks loop over rows, and every row is still written."""
    gen = torch.Generator().manual_seed(15)
    n, v = MAX_BLOCKS + 4099, 9
    x = (torch.randn(n, v, generator=gen) * 3).cuda().requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen).cuda()
    labels[::7] = -100
    lp, en = ao.token_logprobs(x, labels, temperature=0.8, compute_entropy=True, backend=cuda_backend)
    rl, _, re = ref_token_stats(x.detach().double(), labels, 0.8)
    torch.testing.assert_close(lp.double(), rl, rtol=0, atol=1e-5)
    torch.testing.assert_close(en.double(), re, rtol=0, atol=1e-5)
    (lp.sum() + en.sum()).backward()
    xr = x.detach().double().requires_grad_(True)
    rl, _, re = ref_token_stats(xr, labels, 0.8)
    (rl.sum() + re.sum()).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=2e-5)


@pytest.mark.gpu
def test_compile_fullgraph_cuda(cuda_backend):
    gen = torch.Generator().manual_seed(16)
    x = make_logits(8, 1031, torch.bfloat16, "normal", gen, "cuda")
    labels = make_labels(x, gen, 0.25)

    def f(x, labels):
        lp, en = ao.token_logprobs(x, labels, temperature=0.9, compute_entropy=True, backend="cuda")
        return (lp * 2 - 0.1 * en).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    f(x1, labels).backward()
    compiled(x2, labels).backward()
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets_large_batch(cuda_backend):
    """N * V = 2.5e9 > 2^31 elements (5 GB of bf16): rows past the 2^31-th element are right, forward
    and the in-place backward."""
    n, v = 16384, 151936
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    torch.manual_seed(17)
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::5] = -100
    # row 14134 straddles element 2^31 (14134 * V < 2^31 < 14135 * V); 14135 is the first row past it
    rows = torch.tensor([0, 1, n // 2, 14134, 14135, n - 2, n - 1], device="cuda")
    assert int(rows.max()) * v > 2**31
    labels[rows] = torch.tensor([5, v - 1, 77, 0, v - 1, 1234, v - 2], device="cuda")
    x[rows, labels[rows]] += 30  # peaked rows: a wrong offset would miss the peak
    logp, lse, ent = token_stats_op(x.unsqueeze(0), labels, 1.0, -100, True, cuda_backend)
    sel = x[rows]
    rl, rlse, re = oracle_stats(sel, labels[rows], 1.0)
    torch.testing.assert_close(logp[rows].double(), rl, rtol=0, atol=1e-5 * max(1.0, rl.abs().max().item()))
    torch.testing.assert_close(lse[rows].double(), rlse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[rows].double(), re, rtol=0, atol=1e-5 * max(1.0, re.abs().max().item()))
    ignored = labels == -100
    assert ignored.sum() > 3000 and (logp[ignored] == 0).all()

    ga = torch.randn(n, device="cuda")
    gb = torch.randn(n, device="cuda")
    xs = sel.double().requires_grad_(True)
    rl2, _, re2 = ref_token_stats(xs, labels[rows], 1.0)
    (rl2 * ga[rows].double() + re2 * gb[rows].double()).sum().backward()
    _backend.kernel("token_stats_bwd", cuda_backend)(
        x.unsqueeze(0), labels, logp, lse, ent, ga, gb, 1.0, -100, True, x.unsqueeze(0))
    got = x[rows].double()
    # bf16 output: rounding to nearest is half an ulp (2^-9 relative), one ulp when the fp32 value
    # sits within its own error of a rounding boundary; plus the fp32 budget.
    scale = (ga[rows].abs() + gb[rows].abs()).max().item()
    err = (got - xs.grad).abs()
    bound = xs.grad.abs() * 2**-8 + 1e-5 * scale
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    assert torch.count_nonzero(x[ignored]) == 0
