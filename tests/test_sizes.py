"""Sizes where peers shipped overflows: more than 2^31 logits elements, and row offsets past 2^31.

Liger and verl each shipped int32 offsets that wrapped once tokens x vocab passed 2^31 elements.
Here the rows that straddle and follow element 2^31 are checked against float64, forward and
backward, on the cpu backend (4.3 GB of bf16 logits, made mostly of zeros so that the untouched
rows have a known answer too: a uniform row gives logp = -log V and H = log V) and on the Triton
kernels (interpreted: three rows of a strided view whose last row starts past element 2^31).
The CUDA launchers' offsets are checked on the host by tests/cuda_row_selfcheck.cpp, and on a GPU by
tests/test_cuda_kernels.py::test_int64_offsets_large_batch.
"""

from __future__ import annotations

import math

import pytest
import torch

import alignops as ao
from tests import policy_oracle as oracle
from tests.conftest import device_of, fast_backends

V = 151936
N = 14140                    # N * V = 2.148e9 > 2^31
STRADDLE = 14134             # 14134 * V < 2^31 < 14135 * V
CHECKED = [0, 1, N // 2, STRADDLE, STRADDLE + 1, N - 1]
T = 0.7


def _available_bytes() -> int:
    """MemAvailable (free memory plus the page cache the kernel can drop), not the free pages alone:
    after a build most of the memory is cache."""
    import os
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def big_memory():
    """One test of this file at a time across pytest-xdist workers (each holds ~9 GB), then a check
    that the memory is there."""
    import fcntl
    import os
    import tempfile
    with open(os.path.join(tempfile.gettempdir(), "alignops-test-sizes.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        free = _available_bytes()
        if free < 10 * 2**30:
            pytest.skip(f"needs 10 GiB of available memory, {free / 2**30:.1f} GiB available")
        yield


def _oracle_rows(x, labels, a, b):
    """float64 (logp, entropy, d(a*logp + b*H)/dx) of the given rows."""
    z = x.double().requires_grad_()
    valid = labels != -100
    lp, ent = oracle.token_stats(z, labels, T, valid)
    (a.double() * lp + b.double() * ent).sum().backward()
    return lp.detach(), ent.detach(), z.grad


@pytest.mark.skipif("cpu" not in fast_backends(), reason="the cpu backend is not built here")
def test_cpu_past_2_31_elements(big_memory):
    assert STRADDLE * V < 2**31 < (STRADDLE + 1) * V < N * V
    g = torch.Generator().manual_seed(31)
    logits = torch.zeros(N, V, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2::7] = -100
    rows = torch.tensor(CHECKED)
    labels[rows] = torch.tensor([5, V - 1, 77, 0, V - 1, V - 2])
    logits[rows] = (torch.randn(len(CHECKED), V, generator=g) * 2).bfloat16()
    logits[rows, labels[rows]] += 12  # peaked at the label: a row read at a wrong offset misses the peak
    a, b = torch.randn(N, generator=g), torch.randn(N, generator=g)

    leaf = logits.requires_grad_()
    lp, ent = ao.token_logprobs(leaf, labels, temperature=T, compute_entropy=True, backend="cpu")
    (a * lp + b * ent).sum().backward()
    grad = leaf.grad
    del leaf

    want_lp, want_ent, want_grad = _oracle_rows(logits.detach()[rows], labels[rows], a[rows], b[rows])
    torch.testing.assert_close(lp[rows].double(), want_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent[rows].double(), want_ent, rtol=0, atol=2e-5)
    # bf16 gradient: the float64 value rounded once (half an ulp), plus the fp32 math below it
    torch.testing.assert_close(grad[rows].double(), want_grad, rtol=2**-8, atol=1e-9)

    # the zero rows: uniform over V
    uniform = torch.ones(N, dtype=torch.bool)
    uniform[rows] = False
    valid = uniform & (labels != -100)
    assert valid[STRADDLE + 2:].sum() > 0
    torch.testing.assert_close(lp[valid], torch.full_like(lp[valid], -math.log(V)), rtol=0, atol=2e-6)
    torch.testing.assert_close(ent[valid], torch.full_like(ent[valid], math.log(V)), rtol=0, atol=2e-6)
    assert (lp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    assert (grad[labels == -100] == 0).all()
    last = N - 2 if bool(valid[N - 2]) else int(valid.nonzero()[-1])
    # d(a logp + b H)/dz_v on a uniform row: a (1[v=y] - 1/V) / T; H's gradient vanishes there
    want = torch.full((V,), -a[last].item() / V / T, dtype=torch.float64)
    want[labels[last]] += a[last].item() / T
    torch.testing.assert_close(grad[last].double(), want, rtol=2**-8, atol=1e-12)


@pytest.mark.skipif("triton" not in fast_backends() or device_of("triton") != "cpu",
                    reason="runs the interpreted Triton kernels (no GPU)")
def test_triton_row_offsets_past_2_31(big_memory):
    """Three rows of V = 67 at a row stride of 2^30 + 7 elements: the last starts past element
    2^31 of the buffer (4.3 GB of bf16, zeros but for the three rows)."""
    v, stride = 67, 2**30 + 7
    buffer = torch.zeros(2 * stride + v, dtype=torch.bfloat16)
    x = buffer.as_strided((3, v), (stride, 1))
    assert x.storage_offset() + 2 * stride > 2**31
    g = torch.Generator().manual_seed(5)
    x.copy_((torch.randn(3, v, generator=g) * 3).bfloat16())
    labels = torch.tensor([3, v - 1, 0])
    x[torch.arange(3), labels] += 9
    a, b = torch.randn(3, generator=g), torch.randn(3, generator=g)

    leaf = x.detach().requires_grad_()  # the strided view itself is the leaf
    lp, ent = ao.token_logprobs(leaf, labels, temperature=T, compute_entropy=True, backend="triton")
    (a * lp + b * ent).sum().backward()
    want_lp, want_ent, want_grad = _oracle_rows(x, labels, a, b)
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=0, atol=2e-5)
    torch.testing.assert_close(leaf.grad.double(), want_grad, rtol=2**-8, atol=1e-9)
