"""The one-launch policy loss (fused_policy_loss(grad_in_forward=True) on the cpu and triton
backends): the per-token epilogue of csrc/common/policy_math.h / kernels/policy_loss.py against

  - the two-pass path (token_logprobs + policy_loss through autograd, grad_in_forward=False) on the
    same backend: loss and logits gradient, fp32 and bf16;
  - float64: the one-launch cpu kernel on float64 logits against autograd through the eager torch
    reference, which shares no per-token code with the kernels.

Inputs put ratios in every clip branch (below 1 - eps, inside, between the upper bounds, above the
dual clip), with equal-reward rows (A = 0), IS weights, masked tokens, ignored labels, an empty row,
temperature 0.7, prime and real vocabularies and logits peaked at +50 or shifted by +-1000.
"""
from __future__ import annotations

import importlib
import math
import zlib

import pytest
import torch

import alignops as ao
from tests.conftest import backends_for

# the module, not the function of the same name that alignops re-exports
pl = importlib.import_module("alignops.policy_loss")
BACKENDS = [b for b in backends_for("cpu") if b in ("cpu", "triton")]
KLS = [None, "k1", "k2", "k3", "low_var_kl"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
TEMPERATURE = 0.7

# method -> its own options (and shared knobs) exercised here; dual clip where the method has it
METHOD_KW = {
    "ppo": {},
    "grpo": {"clip_ratio_c": 3.0},
    "dapo": {"clip_ratio_c": 3.0},
    "dr_grpo": {},
    "gppo": {"gppo_beta1": 0.5, "gppo_beta2": 0.75, "clip_ratio_c": 3.0},
    "gppo_klear": {},
    "cispo": {},
    "cispo_scalerl": {},
    "reinforce": {},
    "gpg": {"gpg_alpha": 1.5},
    "ecpo": {"ecpo_delta": 0.1},
}
# Target ratios across the branches of bounds 0.8 / 1.2 / 1.28 / dual 3 / CISPO's 5, jittered off
# the bounds (ties are measure-zero; the A = 0 rows cover the maximum's tie rule).
RATIO_TARGETS = (0.5, 0.75, 0.9, 1.1, 1.24, 1.5, 2.5, 4.0, 7.0)


def make_case(B, T, V, seed, dtype=torch.float32, pattern="normal"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=gen)
    if pattern == "peaked":
        # a label logit at +50: logp ~ 0 and p ~ 1 exactly in fp32
        x.view(-1, V)[torch.arange(B * T), labels.reshape(-1)] += 50
    elif pattern == "shifted":
        x += 1000 * torch.sign(torch.randn(B, 1, 1, generator=gen, dtype=torch.float64))
    labels[0, -1] = -100
    logits = x.to(dtype)
    with torch.no_grad():
        lp = torch.log_softmax(logits.double() / TEMPERATURE, -1).gather(
            -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    targets = torch.tensor(RATIO_TARGETS, dtype=torch.float64)
    r = targets[torch.randint(len(RATIO_TARGETS), (B, T), generator=gen)]
    r = r * torch.exp(0.01 * torch.randn(B, T, generator=gen, dtype=torch.float64))
    old = (lp - torch.log(r)).float()
    ref = (lp + 0.7 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=gen).float()
    adv[min(1, B - 1)] = 0.0  # an equal-reward group: A = 0 on the whole row
    mask = torch.rand(B, T, generator=gen) > 0.2
    if B > 2:
        mask[2] = False  # an empty row
    isw = (0.25 + 1.5 * torch.rand(B, T, generator=gen)).float()
    return logits, labels, old, ref, adv, mask, isw


def run(logits, labels, old, adv, mask, *, backend, one_launch, monkeypatch=None, **kw):
    """(loss, grad, metrics, whether the one-launch kernel ran)."""
    calls = []
    if monkeypatch is not None:
        real = pl._epilogue_policy_loss

        def spy(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        monkeypatch.setattr(pl, "_epilogue_policy_loss", spy)
    x = logits.detach().clone().requires_grad_()
    out = ao.fused_policy_loss(x, labels, old, adv, mask, backend=backend, temperature=TEMPERATURE,
                               grad_in_forward=one_launch, **kw)
    out.loss.backward()
    if monkeypatch is not None:
        monkeypatch.setattr(pl, "_epilogue_policy_loss", real)
    return out.loss.detach(), x.grad, out.metrics, bool(calls)


def assert_same(one, two, dtype):
    (loss1, g1, m1, _), (loss2, g2, m2, _) = one, two
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-7)
    scale = g2.abs().max().item()
    if dtype == torch.bfloat16:
        # both paths round (near-)equal fp32 gradients to bf16: at most one bf16 ulp apart
        torch.testing.assert_close(g1.float(), g2.float(), rtol=2 ** -8, atol=2 ** -8 * scale)
    else:
        # a and b agree to a few fp32 ulp (the kernel's exp/expm1 vs torch's)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6 * scale)
    assert set(m1) == set(m2)
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6, msg=k)
    assert torch.isfinite(g1).all()


def kwargs_for(method, kl, entropy_coef, agg, ref, isw, T, use_is):
    kw = {"method": method, "agg": agg, "max_len": T, "entropy_coef": entropy_coef, **METHOD_KW[method]}
    if kl is not None:
        kw.update(ref_logp=ref, kl_coef=0.05, kl_estimator=kl)
    if use_is:
        kw["rollout_is_weights"] = isw
    return kw


@pytest.mark.skipif("cpu" not in BACKENDS, reason="alignops._C not built")
@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_cpu_one_launch_equals_two_pass_every_combination(method, monkeypatch):
    B, T, V = 4, 6, 37
    logits, labels, old, ref, adv, mask, isw = make_case(B, T, V, seed=hash(method) % 997)
    i = 0
    for kl in KLS:
        for entropy_coef in (0.0, 0.01):
            for agg in AGGS:
                i += 1
                kw = kwargs_for(method, kl, entropy_coef, agg, ref, isw, T, use_is=i % 2 == 0)
                one = run(logits, labels, old, adv, mask, backend="cpu", one_launch=True,
                          monkeypatch=monkeypatch, **kw)
                two = run(logits, labels, old, adv, mask, backend="cpu", one_launch=False, **kw)
                assert one[3], (method, kl, entropy_coef, agg)
                assert_same(one, two, torch.float32)


TRITON_CASES = [
    ("grpo", "k3", 0.01, "token-mean", "peaked"),
    ("dapo", "low_var_kl", 0.0, "seq-mean-token-mean", "shifted"),
    ("gppo", "k2", 0.01, "seq-mean-token-mean", "normal"),
    ("cispo", "low_var_kl", 0.01, "seq-mean-token-sum", "normal"),
    ("reinforce", "k1", 0.0, "seq-mean-token-sum", "peaked"),
    ("gpg", None, 0.01, "token-mean", "normal"),
    ("ecpo", "k3", 0.0, "seq-mean-token-sum-norm", "shifted"),
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("method,kl,entropy_coef,agg,pattern", TRITON_CASES)
def test_triton_one_launch_equals_two_pass(method, kl, entropy_coef, agg, pattern, monkeypatch):
    B, T, V = 3, 3, 127
    logits, labels, old, ref, adv, mask, isw = make_case(B, T, V, seed=len(method) * 31 + len(agg), pattern=pattern)
    kw = kwargs_for(method, kl, entropy_coef, agg, ref, isw, T, use_is=entropy_coef == 0)
    one = run(logits, labels, old, adv, mask, backend="triton", one_launch=True, monkeypatch=monkeypatch, **kw)
    two = run(logits, labels, old, adv, mask, backend="triton", one_launch=False, **kw)
    assert one[3]
    assert_same(one, two, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["grpo", "gppo", "cispo"])
def test_bf16_one_launch_equals_two_pass(backend, method, monkeypatch):
    logits, labels, old, ref, adv, mask, isw = make_case(3, 3, 67, seed=5, dtype=torch.bfloat16)
    kw = kwargs_for(method, "k3", 0.01, "token-mean", ref, isw, 3, use_is=True)
    one = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, monkeypatch=monkeypatch, **kw)
    two = run(logits, labels, old, adv, mask, backend=backend, one_launch=False, **kw)
    assert one[3]
    assert one[1].dtype == torch.bfloat16
    assert_same(one, two, torch.bfloat16)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="alignops._C not built")
@pytest.mark.parametrize("method", sorted(METHOD_KW))
@pytest.mark.parametrize("pattern", ["normal", "peaked", "shifted"])
def test_cpu_float64_against_autograd_reference(method, pattern, monkeypatch):
    """float64 logits: the kernel's closed-form a, b vs autograd through the eager torch path."""
    B, T, V = 3, 5, 31
    logits, labels, old, ref, adv, mask, isw = make_case(B, T, V, seed=11, dtype=torch.float64, pattern=pattern)
    for kl, agg in (("k3", "token-mean"), ("low_var_kl", "seq-mean-token-mean"), ("k2", "seq-mean-token-sum")):
        kw = kwargs_for(method, kl, 0.02, agg, ref.double(), isw.double(), T, use_is=True)
        one = run(logits, labels, old.double(), adv.double(), mask, backend="cpu", one_launch=True,
                  monkeypatch=monkeypatch, **kw)
        two = run(logits, labels, old.double(), adv.double(), mask, backend="torch", one_launch=False, **kw)
        assert one[3]
        torch.testing.assert_close(one[0], two[0], rtol=1e-12, atol=1e-12)
        # absolute: peaked rows' gradients are a * (1 - p_y) ~ a * e^-71, pure cancellation noise
        # of size eps64 * |a| in both paths, while a and b themselves are O(1)
        torch.testing.assert_close(one[1], two[1], rtol=1e-10, atol=1e-13)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="alignops._C not built")
def test_log_ratio_clamp_and_normalizer(monkeypatch):
    """Clamped log-ratios (zero gradient outside the clamp), an explicit and a zero normaliser."""
    logits, labels, old, ref, adv, mask, isw = make_case(3, 6, 41, seed=3)
    for extra in ({"ratio_log_clamp": 0.3}, {"ratio_log_clamp": None}, {"normalizer": 7.0},
                  {"normalizer": torch.tensor(11.0)}, {"normalizer": 0.0}):
        for method in ("grpo", "gppo", "cispo", "ecpo"):
            kw = {**kwargs_for(method, "k3", 0.01, "seq-mean-token-mean", ref, isw, 6, use_is=True), **extra}
            one = run(logits, labels, old, adv, mask, backend="cpu", one_launch=True, monkeypatch=monkeypatch, **kw)
            two = run(logits, labels, old, adv, mask, backend="cpu", one_launch=False, **kw)
            assert one[3]
            assert_same(one, two, torch.float32)
            if extra.get("normalizer") == 0.0:
                assert one[0].item() == 0.0 and not one[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_packed_and_inplace(backend, monkeypatch):
    """old_logp=None, the packed [N, V] layout with cu_seqlens, and inplace_grad (the gradient is
    written into the logits buffer itself)."""
    logits, labels, old, ref, adv, mask, isw = make_case(2, 10, 53, seed=9)
    logits, labels, old, ref, mask = logits[0], labels[0], old[0], ref[0], mask[0]
    cu = torch.tensor([0, 3, 3, 7, 10])
    adv_rows = torch.tensor([0.5, -1.0, 0.0, 2.0])
    for old_logp in (None, old):
        kw = dict(method="grpo", cu_seqlens=cu, ref_logp=ref, kl_coef=0.1, kl_estimator="k3",
                  entropy_coef=0.01, agg="seq-mean-token-mean")
        one = run(logits, labels, old_logp, adv_rows, mask, backend=backend, one_launch=True,
                  monkeypatch=monkeypatch, **kw)
        two = run(logits, labels, old_logp, adv_rows, mask, backend=backend, one_launch=False, **kw)
        assert one[3]
        assert_same(one, two, torch.float32)
    leaf = logits.detach().clone().requires_grad_()
    buf = leaf * 1
    upstream = []
    buf.register_hook(upstream.append)
    out = ao.fused_policy_loss(buf, labels, old, adv_rows, mask, backend=backend, temperature=TEMPERATURE,
                               grad_in_forward=True, inplace_grad=True, **kw)
    out.loss.backward()
    assert upstream[0].data_ptr() == buf.data_ptr()
    torch.testing.assert_close(leaf.grad, two[1], rtol=1e-5, atol=1e-6 * two[1].abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab(backend, monkeypatch):
    """Real vocabularies (not multiples of any tile), peaked rows, one ignored row."""
    vocabs = (151936, 129920) if backend == "cpu" else (129920,)
    for V in vocabs:
        logits, labels, old, ref, adv, mask, isw = make_case(1, 3 if backend == "cpu" else 2, V, seed=V % 101,
                                                             pattern="peaked")
        kw = kwargs_for("dapo", "k3", 0.01, "token-mean", ref, isw, 3, use_is=True)
        one = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, monkeypatch=monkeypatch, **kw)
        two = run(logits, labels, old, adv, mask, backend=backend, one_launch=False, **kw)
        assert one[3]
        assert_same(one, two, torch.float32)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="alignops._C not built")
@pytest.mark.parametrize("method,extra", [("gspo", {}), ("gspo-token", {}), ("bapo", {}),
                                          ("ecpo", {"ratio_level": "sequence"}), ("gpg", {"group_size": 2})])
def test_sequence_level_methods_keep_the_two_pass_path(method, extra, monkeypatch):
    logits, labels, old, ref, adv, mask, isw = make_case(4, 3, 29, seed=1)
    adv = adv[:, 0].contiguous()
    one = run(logits, labels, old, adv, mask, backend="cpu", one_launch=True, monkeypatch=monkeypatch,
              method=method, **extra)
    two = run(logits, labels, old, adv, mask, backend="cpu", one_launch=False, method=method, **extra)
    assert not one[3]
    assert_same(one, two, torch.float32)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="alignops._C not built")
def test_bad_input_names_the_argument():
    logits, labels, old, ref, adv, mask, isw = make_case(2, 3, 17, seed=2)
    x = logits.clone().requires_grad_()
    kw = dict(backend="cpu", grad_in_forward=True, method="grpo")
    with pytest.raises(ValueError, match="advantages"):
        ao.fused_policy_loss(x, labels, old, adv[:, :2], mask, **kw)
    with pytest.raises(TypeError, match="old_logp"):
        ao.fused_policy_loss(x, labels, old.to(torch.int64), adv, mask, **kw)
    with pytest.raises(ValueError, match="ref_logp"):
        ao.fused_policy_loss(x, labels, old, adv, mask, kl_coef=0.1, **kw)
    with pytest.raises(ValueError, match="normalizer"):
        ao.fused_policy_loss(x, labels, old, adv, mask, normalizer=-1.0, **kw)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        ao.fused_policy_loss(x, labels, old, adv, mask, rollout_is_weights=isw[:, :1], **kw)
    with pytest.raises(ValueError, match="clip_low"):
        ao.fused_policy_loss(x, labels, old, adv, mask, clip_low=1.5, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_masked_is_zero(backend):
    logits, labels, old, ref, adv, mask, isw = make_case(2, 3, 17, seed=4)
    x = logits.clone().requires_grad_()
    out = ao.fused_policy_loss(x, labels, old, adv, torch.zeros_like(mask), backend=backend, grad_in_forward=True,
                               method="grpo", ref_logp=ref, kl_coef=0.1, entropy_coef=0.01)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert not x.grad.any()
    assert all(math.isfinite(v.item()) for v in out.metrics.values())
