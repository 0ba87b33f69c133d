"""Nothing falls back silently: a fast backend that cannot run, or a kernel that cannot
be loaded, is an error naming the cause when the caller named the backend (argument or
ALIGNOPS_BACKEND), and otherwise exactly one RuntimeWarning naming the cause, with a correct result.

Availability is monkeypatched: triton "not installed", alignops._C "without CUDA kernels" or
"missing" for the CPU kernels, the one-launch kernel's loader failing. CUDA tensors cannot be made
here without a GPU, so their cases check the backend resolution itself; with a GPU (marked gpu) the
ops also run on CUDA tensors with triton hidden and are compared with float64.
"""
from __future__ import annotations

import ast
import importlib
import pathlib
import re
import warnings

import pytest
import torch

import alignops as ao
from alignops import _backend
from alignops import advantages as adv_mod
from tests import policy_oracle as oracle
from tests.conftest import HAS_CUDA, backends_for

pl = importlib.import_module("alignops.policy.fused")  # its terminal_one_launch is the one-launch route
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
NO_TRITON = "triton is not installed (hidden by the test)"
NO_C = "alignops._C could not be loaded (hidden by the test)"


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees a process that has warned nothing yet, with no backend named."""
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_pending", set())
    monkeypatch.delenv("ALIGNOPS_BACKEND", raising=False)


def hide_triton(monkeypatch):
    monkeypatch.setattr(_backend, "_triton_importable", lambda: NO_TRITON)


def hide_cuda_kernels(monkeypatch):
    monkeypatch.setattr(_backend, "c_has_cuda", lambda: False)


def hide_cpu_kernels(monkeypatch):
    monkeypatch.setattr(_backend, "cpu_error", lambda: NO_C)


def fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)
            and "alignops" in str(w.message)]


def exactly_one_warning(fn, *causes, calls=3):
    """Runs fn `calls` times; asserts one alignops RuntimeWarning naming every cause; returns the
    results."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        results = [fn() for _ in range(calls)]
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages
    for cause in causes:
        assert cause in messages[0], (cause, messages[0])
    return results


# --------------------------------------------------------------------------------------------
# CUDA tensors with neither triton nor the CUDA kernels


def test_cuda_tensor_without_triton_or_cuda_kernels(monkeypatch):
    hide_triton(monkeypatch)
    hide_cuda_kernels(monkeypatch)
    chosen = exactly_one_warning(lambda: _backend.resolve_backend(None, CUDA, what="the logits-pass ops"),
                                 NO_TRITON, "without CUDA kernels", "falls back to the slow torch backend",
                                 "cuda tensors")
    assert chosen == ["torch"] * 3
    with pytest.raises(ao.BackendUnavailableError, match=re.escape(NO_TRITON)):
        _backend.resolve_backend("triton", CUDA)
    with pytest.raises(ao.BackendUnavailableError, match="without CUDA kernels"):
        _backend.resolve_backend("cuda", CUDA)
    monkeypatch.setenv("ALIGNOPS_BACKEND", "triton")  # named through the environment: an error too
    with pytest.raises(ao.BackendUnavailableError, match=re.escape(NO_TRITON)):
        _backend.resolve_backend(None, CUDA)


def test_cuda_tensor_without_triton_uses_the_cuda_kernels_silently(monkeypatch):
    """Not a fallback: the cuda backend is the documented second choice for CUDA tensors."""
    hide_triton(monkeypatch)
    monkeypatch.setattr(_backend, "c_has_cuda", lambda: True)
    monkeypatch.setattr(_backend, "c_error", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve_backend(None, CUDA) == "cuda"


# --------------------------------------------------------------------------------------------
# advantage ops: triton and torch kernels only on CUDA tensors


def test_advantage_ops_on_cuda_without_triton(monkeypatch):
    hide_triton(monkeypatch)
    monkeypatch.setattr(_backend, "c_has_cuda", lambda: True)  # even with CUDA kernels for the logits
    monkeypatch.setattr(_backend, "c_error", lambda: None)
    chosen = exactly_one_warning(lambda: adv_mod._resolve(None, CUDA), NO_TRITON,
                                 "the advantage ops has no cuda kernel", "the advantage ops")
    assert chosen == ["torch"] * 3
    with pytest.raises(ao.BackendUnavailableError, match="no 'cuda' kernel"):
        adv_mod._resolve("cuda", CUDA)
    with pytest.raises(ao.BackendUnavailableError, match=re.escape(NO_TRITON)):
        adv_mod._resolve("triton", CUDA)


def test_advantage_torch_kernels_keep_the_device():
    """The torch backend of the advantage ops runs where its inputs are (no .cpu() round trip):
    every output is allocated by the caller on the input's device and written in place."""
    package = pathlib.Path(adv_mod.__file__).parent  # alignops/advantages/: every file of the package
    src = "".join(f.read_text() for f in sorted(package.glob("*.py"))) + pathlib.Path(
        importlib.import_module("alignops.reference.advantages").__file__).read_text()
    assert ".cpu()" not in src and ".numpy()" not in src and ".tolist()" not in src


def test_advantage_ops_on_cpu_without_c(monkeypatch):
    hide_cpu_kernels(monkeypatch)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    results = exactly_one_warning(lambda: ao.grpo_advantages(rewards, group_size=3), NO_C, "the advantage ops")
    r = rewards.double().view(2, 3)
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
    want = torch.where(std > 0, (r - mean) / (std + 1e-6), torch.zeros_like(r)).view(-1)
    for got in results:
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ao.BackendUnavailableError, match=re.escape(NO_C)):
        ao.grpo_advantages(rewards, group_size=3, backend="cpu")


# --------------------------------------------------------------------------------------------
# logits-pass ops on CPU tensors without the CPU kernels


def logits_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 9, generator=gen) * 2
    labels = torch.randint(0, 9, (2, 4), generator=gen)
    labels[1, 2:] = -100
    old = torch.randn(2, 4, generator=gen) - 2.0
    return logits, labels, old, torch.tensor([0.7, -1.2])


def test_logits_ops_on_cpu_without_c(monkeypatch):
    hide_cpu_kernels(monkeypatch)
    logits, labels, old, adv = logits_case()

    def both():
        lp = ao.token_logprobs(logits, labels)
        out = ao.fused_policy_loss(logits, labels, old, adv, method="grpo")
        return lp, out.loss
    results = exactly_one_warning(both, NO_C, "the logits-pass ops")
    valid = labels != -100
    want_lp, _ = oracle.token_stats(logits.double(), labels, 1.0, valid)
    o = oracle.policy_loss(logits, labels, old, adv, None)
    for lp, loss in results:
        torch.testing.assert_close(lp.double(), want_lp, rtol=1e-6, atol=1e-6)
        assert abs(loss.item() - o.loss.item()) <= 1e-5 * o.scale.item()
    with pytest.raises(ao.BackendUnavailableError, match=re.escape(NO_C)):
        ao.token_logprobs(logits, labels, backend="cpu")


# --------------------------------------------------------------------------------------------
# the one-launch policy kernel failing to load


def break_one_launch(monkeypatch, backend, exc):
    key = ("policy_loss_fused", backend)

    def loader():
        raise exc
    monkeypatch.setitem(_backend._KERNEL_LOADERS, key, loader)
    if key in _backend._KERNEL_CACHE:
        monkeypatch.delitem(_backend._KERNEL_CACHE, key)


def spy_one_launch(monkeypatch):
    calls = []
    real = pl.terminal_one_launch

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(pl, "terminal_one_launch", spy)
    return calls


def one_launch_loss(backend=None):
    logits, labels, old, adv = logits_case(1)
    x = logits.clone().requires_grad_()
    out = ao.fused_policy_loss(x, labels, old, adv, method="grpo", entropy_coef=0.01, backend=backend,
                               grad_in_forward=True)
    out.loss.backward()
    return out.loss.detach(), x.grad


@pytest.mark.skipif("cpu" not in backends_for("cpu"), reason="alignops._C not built")
def test_one_launch_kernel_that_fails_to_load_cpu(monkeypatch):
    cause = "'_OpNamespace' 'alignops_C' object has no attribute 'policy_loss_fused_cpu' (test)"
    break_one_launch(monkeypatch, "cpu", AttributeError(cause))
    calls = spy_one_launch(monkeypatch)
    results = exactly_one_warning(one_launch_loss, "policy_loss_fused", cause, "two-pass")
    assert not calls  # the kernel never ran: the two-pass kernels did
    logits, labels, old, adv = logits_case(1)
    o = oracle.policy_loss(logits, labels, old, adv, None, entropy_coef=0.01)
    for loss, grad in results:
        assert abs(loss.item() - o.loss.item()) <= 1e-5 * o.scale.item()
        torch.testing.assert_close(grad.double(), o.grad, rtol=1e-5, atol=1e-5 * o.coef.item())
    with pytest.raises(ao.BackendUnavailableError, match=re.escape(cause)):
        one_launch_loss("cpu")
    monkeypatch.setenv("ALIGNOPS_BACKEND", "cpu")
    with pytest.raises(ao.BackendUnavailableError, match="policy_loss_fused"):
        one_launch_loss()


@pytest.mark.skipif("triton" not in backends_for("cpu"), reason="triton backend unavailable")
def test_one_launch_kernel_that_fails_to_load_triton(monkeypatch):
    cause = "cannot import name '_policy_loss_fused_kernel' (test)"
    break_one_launch(monkeypatch, "triton", ImportError(cause))
    with pytest.raises(ao.BackendUnavailableError, match=re.escape(cause)):
        one_launch_loss("triton")


def test_a_broken_kernel_is_not_hidden(monkeypatch):
    """Only 'cannot be loaded' (missing op, missing module) is a fallback; a kernel module that
    raises anything else propagates, whichever backend was chosen."""
    backend = _backend.resolve_backend(None, CPU)
    if backend not in ("cpu", "triton"):
        pytest.skip("no one-launch kernel on this machine")
    break_one_launch(monkeypatch, backend, ZeroDivisionError("a bug in the kernel module"))
    with pytest.raises(ZeroDivisionError, match="a bug"):
        one_launch_loss()


def broad_excepts(files) -> list[str]:
    """`except:`, `except Exception` or `except BaseException` handlers that swallow: a handler that
    ends by re-raising (cleanup, then `raise`) passes the error on and is not one."""
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ExceptHandler):
                continue
            names = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            broad = node.type is None or any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException")
                                              for n in names)
            reraises = isinstance(node.body[-1], ast.Raise) and node.body[-1].exc is None
            if broad and not reraises:
                bad.append(f"{f}:{node.lineno}")
    return bad


def test_no_broad_except_anywhere_in_the_package():
    """No handler that swallows every error in any module of the package (alignops/ and every
    subpackage, kernels/), read through the package, installed or not: a kernel bug must surface,
    never turn into a fallback."""
    import alignops.kernels  # noqa: PLC0415
    pkg = pathlib.Path(ao.__file__).resolve().parent
    files = sorted(pkg.rglob("*.py")) + sorted(pathlib.Path(alignops.kernels.__file__).resolve().parent.glob("*.py"))
    assert len(files) > 50, files
    assert not broad_excepts(files)


def test_the_broad_except_scan_sees_one(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("try:\n    x = 1\nexcept Exception:\n    pass\ntry:\n    y = 2\nexcept (ValueError, BaseException):\n"
                 "    y = 0\ntry:\n    z = 3\nexcept BaseException:\n    cleanup()\n    raise\n")
    assert broad_excepts([f]) == [f"{f}:3", f"{f}:7"]


# --------------------------------------------------------------------------------------------
# under torch.compile


def test_fallback_under_torch_compile_warns_at_the_next_eager_call(monkeypatch):
    """dynamo rejects warnings.warn inside a full graph: the fallback is traced, its message kept,
    and raised once by the next eager call."""
    hide_cpu_kernels(monkeypatch)
    torch._dynamo.reset()
    logits, labels, _, _ = logits_case()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn = torch.compile(lambda x: ao.token_logprobs(x, labels), fullgraph=True)
        got = fn(logits)
        assert not fallback_warnings(record)
        assert _backend.resolve_backend("torch", CPU) == "torch"
    torch._dynamo.reset()
    messages = fallback_warnings(record)
    assert len(messages) == 1 and NO_C in messages[0], messages
    want, _ = oracle.token_stats(logits.double(), labels, 1.0, labels != -100)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# with a GPU: the ops on CUDA tensors with triton hidden


@pytest.mark.gpu
def test_cuda_ops_without_triton_warn_and_stay_correct(monkeypatch):
    hide_triton(monkeypatch)
    logits, labels, old, adv = (t.cuda() for t in logits_case())
    cuda_kernels = _backend.c_has_cuda()
    calls = 1 if cuda_kernels else 3
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lps = [ao.token_logprobs(logits, labels) for _ in range(calls)]
        advs = [ao.grpo_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0], device="cuda"), group_size=2)
                for _ in range(3)]
    messages = fallback_warnings(record)
    # the logits ops fall back only without the CUDA kernels; the advantage ops always (no cuda kernel)
    assert len(messages) == (1 if cuda_kernels else 2), messages
    assert all(NO_TRITON in m for m in messages)
    want, _ = oracle.token_stats(logits.double().cpu(), labels.cpu(), 1.0, labels.cpu() != -100)
    for lp in lps:
        assert lp.device.type == "cuda"
        torch.testing.assert_close(lp.double().cpu(), want, rtol=1e-5, atol=1e-5)
    for a in advs:
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.cpu(), torch.tensor([0.7071, -0.7071, -0.7071, 0.7071]), rtol=1e-3,
                                   atol=1e-3)
