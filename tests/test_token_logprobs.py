"""token_logprobs on every backend that runs here, against the float64 torch reference.

Error rule (docs/design.md "Tests"): on the same dtype-rounded inputs, a backend's error against
float64 math may not exceed twice the error of eager torch computing in that dtype, plus 1e-5 of
the output's scale (the fp32 bound).
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import alignops as ao
from alignops import _backend
from alignops.reference.token_stats import token_stats as ref_token_stats
from alignops.logits.kernels import token_stats_op
from tests.conftest import HAS_CUDA, device_backend_pairs, make_logits

PAIRS = device_backend_pairs()
PAIR_IDS = [f"{d}-{b}" for d, b in PAIRS]
SMALL_V = [1, 2, 3, 5, 7, 31, 97, 255, 256, 257, 1031, 4099]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_labels(x, gen, ignore_frac=0.2, ignore_index=-100):
    n, v = x.shape[-2] if x.dim() == 3 else x.shape[0], x.shape[-1]
    shape = x.shape[:-1]
    labels = torch.randint(0, v, shape, generator=gen).to(x.device)
    # Labels on -inf logits would make logp = -inf legitimately; keep them finite to compare.
    finite = torch.isfinite(x)
    bad = ~finite.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if bad.any():
        labels[bad] = finite[bad].float().argmax(-1)
    drop = torch.rand(shape, generator=gen) < ignore_frac
    labels[drop.to(x.device)] = ignore_index
    return labels


def eager_in_dtype(x, labels, temperature, ignore_index=-100):
    """What a trainer computes without upcasting: log_softmax and entropy in the input dtype."""
    x = x.detach().requires_grad_(True)
    z = x / temperature
    logp_all = torch.log_softmax(z, -1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.where(valid, logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0)
    p = logp_all.exp()
    ent = torch.where(valid, -(p * torch.where(p > 0, logp_all, 0)).sum(-1), 0)
    return x, logp, ent


def assert_within(name, got, ref, eager, dtype, scale=None):
    """scale: the magnitude 1e-5 is relative to (default: the largest reference value, at least 1)."""
    got, ref, eager = got.double().cpu(), ref.double().cpu(), eager.double().cpu()
    assert torch.isfinite(got).all() == torch.isfinite(ref).all(), f"{name}: non-finite mismatch"
    finite = torch.isfinite(ref)
    err = (got - ref)[finite].abs().max().item() if finite.any() else 0.0
    # Eager torch may itself produce NaN (an all -inf row): such entries say nothing about its error.
    both = finite & torch.isfinite(eager)
    eager_err = (eager - ref)[both].abs().max().item() if both.any() else 0.0
    if scale is None:
        scale = max(1.0, ref[finite].abs().max().item()) if finite.any() else 1.0
    bound = 2 * eager_err + 1e-5 * scale
    assert err <= bound, f"{name} ({dtype}): error {err:.3g} > bound {bound:.3g} (eager {eager_err:.3g})"


def check_against_oracle(x, labels, temperature, backend, ignore_index=-100, with_entropy=True,
                         gen=None):
    """Values and gradients of one backend vs float64 math on the same rounded inputs."""
    gen = gen or torch.Generator().manual_seed(0)
    dtype = x.dtype
    xk = x.detach().requires_grad_(True)
    if with_entropy:
        logp, ent = ao.token_logprobs(xk, labels, temperature=temperature, ignore_index=ignore_index,
                                      compute_entropy=True, backend=backend)
    else:
        logp = ao.token_logprobs(xk, labels, temperature=temperature, ignore_index=ignore_index,
                                 backend=backend)
        ent = None
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    ga = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    gb = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    loss = (logp.double().cpu() * ga).sum()
    if with_entropy:
        loss = loss + (ent.double().cpu() * gb).sum()
    loss.backward()
    assert xk.grad is not None and xk.grad.dtype == dtype and xk.grad.shape == x.shape

    xr = x.detach().cpu().double().requires_grad_(True)
    rl, _, re = ref_token_stats(xr, labels.cpu(), temperature, ignore_index)
    (rl * ga + (re * gb if with_entropy else 0)).sum().backward()

    xe, el, ee = eager_in_dtype(x.cpu(), labels.cpu(), temperature, ignore_index)
    (el.double() * ga + (ee.double() * gb if with_entropy else 0)).sum().backward()
    eg = xe.grad

    assert_within("logp", logp, rl, el, dtype)
    if with_entropy:
        assert_within("entropy", ent, re, ee, dtype)
    # Every gradient entry is a*(1[v=y] - p) - b*p*(log p + H): its natural scale is the upstream
    # gradient over the temperature, even where the terms cancel to 0 (V = 1).
    grad_scale = (ga.abs() + (gb.abs() if with_entropy else 0)).max().item() / temperature
    assert_within("grad", xk.grad, xr.grad, eg, dtype, scale=grad_scale)
    ignored = (labels == ignore_index).cpu()
    assert (logp.cpu()[ignored] == 0).all()
    assert (xk.grad.cpu()[ignored] == 0).all(), "ignored positions must get no gradient"


# --------------------------------------------------------------------------------------------
# oracle comparisons


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), v=st.sampled_from(SMALL_V),
       dtype=st.sampled_from(DTYPES), temperature=st.floats(0.3, 2.0),
       pattern=st.sampled_from(["normal", "peaked", "shifted_up", "shifted_down", "neginf"]),
       ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), with_entropy=st.booleans())
def test_matches_oracle(device, backend, seed, n, v, dtype, temperature, pattern, ignore_frac,
                        with_entropy):
    gen = torch.Generator().manual_seed(seed)
    x = make_logits(n, v, dtype, pattern, gen, device)
    labels = make_labels(x, gen, ignore_frac)
    check_against_oracle(x, labels, temperature, backend, with_entropy=with_entropy, gen=gen)


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("v", [129920, 151936, 100003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab_rows(device, backend, v, dtype):
    """Real vocabulary sizes (not multiples of any tile) and a prime, on a few rows."""
    gen = torch.Generator().manual_seed(v)
    n = 2 if (backend == "triton" and device == "cpu") else 4
    x = make_logits(n, v, dtype, "peaked", gen, device)
    labels = make_labels(x, gen, 0.0)
    labels[0] = v - 1  # the last column, behind the last partial tile
    check_against_oracle(x, labels, 0.7, backend, gen=gen)


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("layout", ["3d", "3d_shifted_slice", "2d_row_stride", "vocab_strided"])
def test_layouts(device, backend, layout):
    """3-D inputs and non-contiguous views: the kernels take row strides, no hidden copy."""
    gen = torch.Generator().manual_seed(1)
    B, T, V = 3, 5, 263
    base = make_logits(B * T, V, torch.float32, "normal", gen, device).view(B, T, V)
    if layout == "3d":
        x = base
    elif layout == "3d_shifted_slice":
        x = base[:, :-1, :]  # logits[:, :-1] as trainers shift them: not viewable as [N, V]
        assert not x.is_contiguous()
    elif layout == "2d_row_stride":
        x = base.view(B * T, V)[::2]
    else:
        x = base.transpose(0, 2).contiguous().transpose(0, 2)  # stride over V != 1: copied
    labels = make_labels(x, gen, 0.2)
    check_against_oracle(x, labels, 1.3, backend, gen=gen)


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_each_output_alone_and_together(device, backend):
    """logp alone, entropy alone, both: each gradient is right and none silently comes back None."""
    gen = torch.Generator().manual_seed(2)
    x = make_logits(4, 37, torch.float32, "normal", gen, device)
    labels = make_labels(x, gen, 0.25)
    xr = x.detach().cpu().double()
    for use in ("logp", "entropy", "both"):
        xk = x.detach().requires_grad_(True)
        xo = xr.clone().requires_grad_(True)
        lp, en = ao.token_logprobs(xk, labels, temperature=0.8, compute_entropy=True, backend=backend)
        rl, _, re = ref_token_stats(xo, labels.cpu(), 0.8)
        pick = {"logp": lambda a, b: a, "entropy": lambda a, b: b, "both": lambda a, b: a - 2 * b}[use]
        pick(lp, en).sum().backward()
        pick(rl, re).sum().backward()
        assert xk.grad is not None, use
        torch.testing.assert_close(xk.grad.cpu().double(), xo.grad, rtol=1e-5, atol=1e-6, msg=use)


# --------------------------------------------------------------------------------------------
# gradcheck in float64 (reference autograd, and the CPU kernel's analytic backward)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if "cpu" in _backend.available_backends("cpu") else []))
@pytest.mark.parametrize("use", ["logp", "entropy", "both"])
def test_gradcheck_float64(backend, use):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    labels = torch.tensor([1, -100, 5, 0])

    def f(x):
        lp, en = ao.token_logprobs(x, labels, temperature=0.7, compute_entropy=True, backend=backend)
        return {"logp": (lp,), "entropy": (en,), "both": (lp, en)}[use]

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_empty_and_all_ignored(device, backend):
    x = torch.randn(0, 11, device=device, requires_grad=True)
    lp = ao.token_logprobs(x, torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    assert lp.shape == (0,) and lp.dtype == torch.float32 and lp.requires_grad
    lp.sum().backward()
    # the gradient reaches the (empty) logits: their shape, dtype and device, all zero
    assert x.grad is not None and x.grad.shape == (0, 11) and x.grad.dtype == x.dtype
    assert x.grad.device == x.device and torch.equal(x.grad, torch.zeros_like(x))
    x = torch.randn(3, 11, device=device, requires_grad=True)
    lp, en = ao.token_logprobs(x, torch.full((3,), -100, device=device), compute_entropy=True, backend=backend)
    assert (lp == 0).all() and (en == 0).all()
    (lp + en).sum().backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_nonfinite_input_gives_nonfinite_output(device, backend):
    x = torch.randn(3, 17, device=device)
    x[1, 4] = float("nan")
    lp, en = ao.token_logprobs(x, torch.tensor([0, 2, 3], device=device), compute_entropy=True, backend=backend)
    assert torch.isnan(lp[1]) and torch.isnan(en[1])
    assert torch.isfinite(lp[[0, 2]]).all()
    with pytest.raises(ValueError, match="logits"):
        ao.token_logprobs(x, torch.tensor([0, 2, 3], device=device), backend=backend, check_finite=True)


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_deterministic_and_row_independent(device, backend):
    """Same input, same bits; a row's result does not depend on the other rows or batch size."""
    gen = torch.Generator().manual_seed(4)
    x = make_logits(6, 1031, torch.float32, "normal", gen, device)
    labels = make_labels(x, gen, 0.0)
    a = ao.token_logprobs(x, labels, compute_entropy=True, backend=backend)
    b = ao.token_logprobs(x, labels, compute_entropy=True, backend=backend)
    c = ao.token_logprobs(x[2:3], labels[2:3], compute_entropy=True, backend=backend)
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    assert torch.equal(a[0][2:3], c[0]) and torch.equal(a[1][2:3], c[1])


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
def test_inplace_backward_kernel_aliasing_logits(device, backend):
    """The kernel contract lets grad_logits alias the logits (in-place backward)."""
    if True:
        gen = torch.Generator().manual_seed(5)
        x = make_logits(5, 301, torch.float32, "normal", gen, device).unsqueeze(0)
        labels = make_labels(x[0], gen, 0.2)
        logp, lse, ent = token_stats_op(x, labels, 1.0, -100, True, backend)
        ga, gb = torch.randn(5, generator=gen).to(device), torch.randn(5, generator=gen).to(device)
        expected = torch.empty_like(x)
        kernel = _backend.kernel("token_stats_bwd", backend)
        kernel(x, labels, logp, lse, ent, ga, gb, 1.0, -100, True, expected)
        inplace = x.clone()
        kernel(inplace, labels, logp, lse, ent, ga, gb, 1.0, -100, True, inplace)
        torch.testing.assert_close(inplace, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# torch.library integration


@pytest.mark.parametrize("backend", [b for d, b in PAIRS if d == "cpu"])
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(6)
    x = make_logits(6, 33, torch.float32, "normal", gen).view(2, 3, 33)
    labels = make_labels(x.view(6, 33), gen, 0.3).view(-1)
    for compute_entropy in (True, False):
        torch.library.opcheck(token_stats_op, (x.requires_grad_(True), labels, 0.9, -100, compute_entropy, backend))


@pytest.mark.skipif("cpu" not in _backend.available_backends("cpu"), reason="alignops._C not built")
def test_torch_compile_fullgraph_cpu():
    gen = torch.Generator().manual_seed(7)
    x = make_logits(8, 129, torch.float32, "normal", gen)
    labels = make_labels(x, gen, 0.25)

    def f(x, labels):
        lp, en = ao.token_logprobs(x, labels, temperature=0.9, compute_entropy=True, backend="cpu")
        return (lp * 2 - 0.1 * en).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager_loss, comp_loss = f(x1, labels), compiled(x2, labels)
    eager_loss.backward()
    comp_loss.backward()
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(x2.grad, x1.grad)


# --------------------------------------------------------------------------------------------
# errors and backend selection


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(logits=torch.randn(3)), ValueError, "logits"),
    (dict(logits=torch.randn(2, 3, 4, 5)), ValueError, "logits"),
    (dict(logits=torch.randn(3, 0), labels=torch.zeros(3, dtype=torch.long)), ValueError, "V = 0"),
    (dict(logits=torch.randn(3, 5).int()), TypeError, "logits"),
    (dict(logits=[[0.0]]), TypeError, "logits"),
    (dict(labels=torch.zeros(3)), TypeError, "labels"),
    (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.tensor([0, 5, 1])), ValueError, r"labels must lie in \[0, 5\)"),
    (dict(labels=torch.tensor([0, -1, 1])), ValueError, "labels"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(backend="tpu"), ValueError, "backend"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(logits=torch.randn(3, 5), labels=torch.tensor([0, 1, -100]))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ao.token_logprobs(**args)


def test_labels_int32_accepted():
    x = torch.randn(4, 9)
    a = ao.token_logprobs(x, torch.tensor([1, 2, 3, -100], dtype=torch.int32))
    b = ao.token_logprobs(x, torch.tensor([1, 2, 3, -100]))
    assert torch.equal(a, b)


def test_named_backend_that_cannot_run_raises():
    x = torch.randn(2, 5)
    with pytest.raises(ao.BackendUnavailableError, match="cuda"):
        ao.token_logprobs(x, torch.tensor([0, 1]), backend="cuda")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only failure message")
def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ao.BackendUnavailableError, match="TRITON_INTERPRET"):
        ao.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")


def test_env_override(monkeypatch):
    monkeypatch.setenv("ALIGNOPS_BACKEND", "torch")
    assert _backend.resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("ALIGNOPS_BACKEND", "cuda")
    with pytest.raises(ao.BackendUnavailableError):
        _backend.resolve_backend(None, torch.device("cpu"))


@pytest.mark.skipif("cpu" not in _backend.available_backends("cpu"), reason="alignops._C not built")
def test_auto_backend_on_cpu_is_cpu(monkeypatch):
    monkeypatch.delenv("ALIGNOPS_BACKEND", raising=False)
    assert _backend.resolve_backend(None, torch.device("cpu")) == "cpu"


def test_stale_extension_gives_clear_message(monkeypatch):
    import alignops._C as C
    monkeypatch.setattr(_backend, "_c_tried", False)
    monkeypatch.setattr(_backend, "_c_module", None)
    monkeypatch.setattr(C, "ABI_VERSION", -7, raising=False)
    assert _backend.load_c() is None
    assert "stale" in _backend.c_error() and "pip install -e ." in _backend.c_error()
    with pytest.raises(ao.BackendUnavailableError, match="stale"):
        ao.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), backend="cpu")
    # the torch backend keeps working
    ao.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), backend="torch")
    monkeypatch.undo()
    _backend._c_tried = False
    assert _backend.load_c() is not None and _backend.c_error() is None
    assert _backend.resolve_backend(None, torch.device("cpu")) == "cpu"  # later tests see a healthy _C


def test_import_is_lazy():
    """`import alignops` initialises no CUDA, imports no triton and loads no extension."""
    code = ("import sys, torch, alignops; "
            "assert not torch.cuda.is_initialized(); "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'alignops._C' not in sys.modules, '_C loaded'; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.skipif("cpu" not in _backend.available_backends("cpu"), reason="alignops._C not built")
def test_torch_compile_as_first_call_in_a_fresh_process():
    """Backend resolution (which loads alignops._C) must not break tracing when the very first
    call of the process is inside torch.compile(fullgraph=True)."""
    code = ("import torch, alignops as ao\n"
            "x = torch.randn(4, 33, requires_grad=True); y = torch.randint(0, 33, (4,))\n"
            "f = torch.compile(lambda x, y: ao.token_logprobs(x, y).sum(), fullgraph=True, backend='aot_eager')\n"
            "f(x, y).backward(); print('ok', x.grad.abs().sum().item() > 0)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok True" in out.stdout, out.stderr[-2000:]
