"""The one-launch policy loss (fused_policy_loss(grad_in_forward=True) on the cpu and triton
backends): the kernel's own loss (its loss_terms, summed), pg_loss (its pg_terms) and logits
gradient against a float64 oracle written in tests/policy_oracle.py (torch float64 math from the
formulas, on the same rounded inputs; it shares no code with alignops), for every method code of
the epilogue (clip: ppo/grpo/dapo/dr_grpo and token-level ecpo, gppo, cispo, reinforce/gpg, sapo, dro,
dppo_tv, dppo_kl), every KL estimator, the entropy bonus, IS weights, dual clip, every aggregation and temperature 0.7.

float32 tolerance: 1e-5 of the aggregate of the terms' absolute values (the terms cancel, and fp32
rounding is relative to their size, not to the sum's), and 1e-5 of the largest gradient entry or
per-token coefficient |dL/dlogp| + |dL/dH|.
float64 logits (cpu): 1e-12.

Inputs put ratios in every clip branch (below 1 - eps, inside, between the upper bounds, above the
dual clip), with equal-reward rows (A = 0), IS weights, masked tokens, ignored labels, an empty row,
prime and real vocabularies and logits peaked at +50 or shifted by +-1000. The remaining metrics
(clip ratios, approx_kl, ...) come from torch on the kernel's logp and are compared with the
two-pass path; `kl` and `entropy` also with the oracle.

Each backend runs on its device (tests.conftest.device_of: cpu on CPU tensors; triton compiled on
CUDA tensors where there is a GPU, else interpreted on CPU tensors): inputs are drawn on CPU, moved
for the op, and its results brought back to CPU for the oracle.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import alignops as ao
from alignops import _backend
from alignops.policy import METHODS
from tests import policy_oracle as oracle
from tests.conftest import device_of, fast_backends

# the module, not the function of the same name that alignops re-exports
pl = importlib.import_module("alignops.policy.fused")  # its terminal_one_launch is the one-launch route
BACKENDS = [b for b in fast_backends() if b in ("cpu", "triton")]  # the backends with a one-launch kernel
KLS = [None, "k1", "k2", "k3", "low_var_kl"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
TEMPERATURE = 0.7

# method -> the options it runs with here: every registry entry with a one-launch form, with the
# first of its examples under which it is token-local (dual clip where the entry's examples have it)
METHOD_KW = {name: next(kw for kw in m.examples if m.one_launch.applies({**m.options, **kw}))
             for name, m in METHODS.items() if m.one_launch is not None}
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
    old[0, -1] = -3.0  # an ignored label with an off-policy old log-prob: must not count
    ref = (lp + 0.7 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=gen).float()
    adv[min(1, B - 1)] = 0.0  # an equal-reward group: A = 0 on the whole row
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[0, -1] = True  # the ignored label is masked in: ignore_index alone must drop it
    if B > 2:
        mask[2] = False  # an empty row
    isw = (0.25 + 1.5 * torch.rand(B, T, generator=gen)).float()
    return logits, labels, old, ref, adv, mask, isw


def on(device, x):
    """`x` on `device`: a tensor moved (None and other values as they are)."""
    return x.to(device) if isinstance(x, torch.Tensor) else x


def kw_on(device, kw):
    return {k: on(device, v) for k, v in kw.items()}


def run(logits, labels, old, adv, mask, *, backend, one_launch, monkeypatch=None, **kw):
    """(loss, grad, metrics, whether the one-launch kernel ran): the op on the tensors moved to
    device_of(backend), its results brought back to CPU."""
    dev = device_of(backend)
    calls = []
    if monkeypatch is not None:
        real = pl.terminal_one_launch

        def spy(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        monkeypatch.setattr(pl, "terminal_one_launch", spy)
    x = logits.detach().to(dev).clone().requires_grad_()
    out = ao.fused_policy_loss(x, on(dev, labels), on(dev, old), on(dev, adv), on(dev, mask), backend=backend,
                               temperature=TEMPERATURE, grad_in_forward=one_launch, **kw_on(dev, kw))
    out.loss.backward()
    if monkeypatch is not None:
        monkeypatch.setattr(pl, "terminal_one_launch", real)
    return out.loss.detach().cpu(), x.grad.cpu(), kw_on("cpu", out.metrics), bool(calls)


def oracle_for(logits, labels, old, adv, mask, **kw):
    return oracle.policy_loss(logits, labels, old, adv, mask, temperature=TEMPERATURE, **kw)


def assert_matches_oracle(one, o, dtype, *, entropy=False, kl=None, ref=None, mask=None, labels=None, what=""):
    """The one-launch result `one` = (loss, grad, metrics, ran) against the oracle `o`."""
    loss, grad, metrics, _ = one
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = o.scale.item()
    for name, got, want in (("loss", loss, o.loss), ("pg_loss", metrics["pg_loss"], o.pg_loss)):
        err = abs(got.double().item() - want.item())
        assert err <= tol * scale + tol * 1e-2, (what, name, got.item(), want.item(), err, scale)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # a gradient entry's rounding noise is relative to the token's coefficients a and b, which
    # can be far larger than the entry (peaked rows: a * (1 - p_y) ~ a * e^-71)
    gmax = max(o.grad.abs().max().item(), o.coef.item())
    if dtype == torch.bfloat16:
        # the fp32 gradient rounded once to bf16
        torch.testing.assert_close(grad.double(), o.grad, rtol=2 ** -8, atol=2 ** -8 * gmax, msg=what)
    else:
        torch.testing.assert_close(grad.double(), o.grad, rtol=tol, atol=tol * gmax, msg=what)
    assert torch.isfinite(grad).all()
    if mask is not None:
        valid = mask & (labels != -100)
        n = max(int(valid.sum()), 1)
        if entropy:
            want = o.entropy.sum() / n
            assert abs(metrics["entropy"].item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())), what
        if kl is not None:
            want = torch.where(valid, oracle.kl_value(o.logp, ref.double(), kl), 0.0).sum() / n
            assert abs(metrics["kl"].item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())), (what, kl)


def assert_metrics_like_two_pass(one, two):
    """Metrics other than pg_loss are torch's on the kernel's logp: as the two-pass path's."""
    m1, m2 = one[2], two[2]
    assert set(m1) == set(m2)
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6, msg=k)


def kwargs_for(method, kl, entropy_coef, agg, ref, isw, T, use_is):
    kw = {"method": method, "agg": agg, "max_len": T, "entropy_coef": entropy_coef, **METHOD_KW[method]}
    if kl is not None:
        kw.update(ref_logp=ref, kl_coef=0.05, kl_estimator=kl)
    if use_is:
        kw["rollout_is_weights"] = isw
    return kw


def check_case(logits, labels, old, ref, adv, mask, isw, *, backend, method, kl, entropy_coef, agg, use_is,
               monkeypatch, two_pass=False, dtype=torch.float32):
    T = labels.shape[-1]
    kw = kwargs_for(method, kl, entropy_coef, agg, ref, isw, T, use_is)
    one = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, monkeypatch=monkeypatch, **kw)
    what = (backend, method, kl, entropy_coef, agg, use_is)
    assert one[3], what
    o = oracle_for(logits, labels, old, adv, mask, **kw)
    assert_matches_oracle(one, o, dtype, entropy=entropy_coef != 0, kl=kl, ref=ref, mask=mask, labels=labels,
                          what=what)
    if two_pass:
        assert_metrics_like_two_pass(one, run(logits, labels, old, adv, mask, backend=backend, one_launch=False,
                                              **kw))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="alignops._C not built")
@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_cpu_one_launch_against_oracle_every_combination(method, monkeypatch):
    """Every KL estimator x entropy bonus on/off x every aggregation x IS weights on/off."""
    B, T, V = 4, 6, 37
    case = make_case(B, T, V, seed=sum(map(ord, method)))
    for kl in KLS:
        for entropy_coef in (0.0, 0.01):
            for agg in AGGS:
                for use_is in (False, True):
                    check_case(*case, backend="cpu", method=method, kl=kl, entropy_coef=entropy_coef, agg=agg,
                               use_is=use_is, monkeypatch=monkeypatch, two_pass=agg == "token-mean" and use_is)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("method", sorted(METHOD_KW))
@pytest.mark.parametrize("pattern", ["normal", "peaked", "shifted"])
def test_triton_one_launch_against_oracle(method, pattern, monkeypatch):
    """Every KL estimator per method; the aggregation, entropy bonus and IS weights cycle with it
    (every aggregation, with and without each, across the methods and patterns)."""
    B, T, V = 3, 3, 127
    offset = sum(map(ord, method + pattern))
    case = make_case(B, T, V, seed=offset, pattern=pattern)
    for i, kl in enumerate(KLS):
        j = i + offset
        check_case(*case, backend="triton", method=method, kl=kl, entropy_coef=0.01 if j % 2 else 0.0,
                   agg=AGGS[j % 4], use_is=(j // 2) % 2 == 0, monkeypatch=monkeypatch, two_pass=i == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["grpo", "gppo", "cispo", "ecpo"])
def test_bf16_one_launch_against_oracle(backend, method, monkeypatch):
    logits, labels, old, ref, adv, mask, isw = make_case(3, 3, 67, seed=5, dtype=torch.bfloat16)
    kw = kwargs_for(method, "k3", 0.01, "token-mean", ref, isw, 3, use_is=True)
    one = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, monkeypatch=monkeypatch, **kw)
    assert one[3]
    assert one[1].dtype == torch.bfloat16
    assert_matches_oracle(one, oracle_for(logits, labels, old, adv, mask, **kw), torch.bfloat16)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="alignops._C not built")
@pytest.mark.parametrize("method", sorted(METHOD_KW))
@pytest.mark.parametrize("pattern", ["normal", "peaked", "shifted"])
def test_cpu_float64_against_oracle(method, pattern, monkeypatch):
    """float64 logits: the kernel's loss terms and closed-form a, b to 1e-12 of the oracle."""
    B, T, V = 3, 5, 31
    logits, labels, old, ref, adv, mask, isw = make_case(B, T, V, seed=11, dtype=torch.float64, pattern=pattern)
    old, ref, adv, isw = old.double(), ref.double(), adv.double(), isw.double()
    for i, kl in enumerate(KLS):
        kw = kwargs_for(method, kl, 0.02, AGGS[i % 4], ref, isw, T, use_is=True)
        one = run(logits, labels, old, adv, mask, backend="cpu", one_launch=True, monkeypatch=monkeypatch, **kw)
        assert one[3]
        o = oracle_for(logits, labels, old, adv, mask, **kw)
        loss, grad, metrics, _ = one
        assert loss.dtype == torch.float64
        assert abs(loss.item() - o.loss.item()) <= 1e-12 * o.scale.item() + 1e-14, (kl, loss.item(), o.loss.item())
        # metrics are fp32 scalars (the API contract): pg_loss is the float64 sum, rounded once
        assert metrics["pg_loss"].dtype == torch.float32
        assert abs(metrics["pg_loss"].item() - o.pg_loss.item()) <= 2 ** -24 * abs(o.pg_loss.item()) + 1e-14
        # absolute: peaked rows' gradients are a * (1 - p_y) ~ a * e^-71, pure cancellation noise
        # of size eps64 * |a|, while a and b themselves are O(1)
        torch.testing.assert_close(grad, o.grad, rtol=1e-10, atol=1e-13)


def make_dppo_case(method, seed, delta_low, delta_high, cap):
    """Tokens whose probability p and old probability p_old put them on both sides of DPPO's
    region bounds (docs/methods.md §2.35) for both signs of A, and above and below the cap: the
    label's probability drawn over (0.02, 0.98), p - p_old over (-0.45, 0.45). Tokens within 1e-4
    of a bound (where one float32 rounding could move them across) are masked out."""
    B, T, V = 4, 16, 31
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, T), generator=gen)
    p_target = 0.02 + 0.96 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    z = x / TEMPERATURE
    others = torch.logsumexp(z.scatter(-1, labels.unsqueeze(-1), float("-inf")), -1)
    x.scatter_(-1, labels.unsqueeze(-1), (TEMPERATURE * (torch.log(p_target / (1 - p_target)) + others)).unsqueeze(-1))
    logits = x.float()
    with torch.no_grad():
        lp = torch.log_softmax(logits.double() / TEMPERATURE, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p = lp.exp()
    p_old = (p - (0.9 * torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.45)).clamp(1e-3, 0.999)
    old = torch.log(p_old).float()
    p_old = old.double().exp()
    adv = torch.randn(B, T, generator=gen).float()
    pos = adv > 0
    if method == "dppo_tv":
        dist, other_side = p - p_old, torch.zeros_like(pos)
        bound = torch.where(pos, delta_high, -delta_low)
    else:
        dist = p_old * torch.log(p_old / p) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
        other_side = torch.where(pos, p <= p_old, p >= p_old)   # inside whatever the KL
        bound = torch.where(pos, delta_high, delta_low)
    inside = torch.where(pos, dist <= bound, dist >= bound) if method == "dppo_tv" else (dist <= bound) | other_side
    r = (lp - old.double()).exp()
    mask = ((dist - bound).abs() > 1e-4) & ((r - cap).abs() > 1e-4)
    # every case the region and the cap distinguish, among the tokens that count
    for sign in (pos, ~pos):
        for where in (inside & ~other_side, ~inside, other_side & (dist > bound)) if method == "dppo_kl" else \
                (inside, ~inside):
            assert (mask & sign & where).any(), (method, seed)
    assert (mask & inside & (r > cap)).any() and (mask & inside & (r < cap)).any(), (method, seed)
    isw = (0.25 + 1.5 * torch.rand(B, T, generator=gen)).float()
    return logits, labels, old, adv, mask, isw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["dppo_tv", "dppo_kl"])
def test_dppo_region_edges_against_oracle(backend, method, monkeypatch):
    """DPPO's one-launch branch on tokens on both sides of each region bound and of the cap (the
    generic cases keep p small, so p - p_old and the binary KL stay far inside the region)."""
    kw = {"method": method, "clip_low": 0.05, "clip_high": 0.1, "dppo_is_cap": 1.5}
    for seed, agg, use_is in ((0, "token-mean", False), (1, "seq-mean-token-mean", True)):
        logits, labels, old, adv, mask, isw = make_dppo_case(method, seed, kw["clip_low"], kw["clip_high"],
                                                             kw["dppo_is_cap"])
        extra = {"agg": agg, **({"rollout_is_weights": isw} if use_is else {})}
        one = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, monkeypatch=monkeypatch,
                  **kw, **extra)
        assert one[3]
        assert_matches_oracle(one, oracle_for(logits, labels, old, adv, mask, **kw, **extra), torch.float32,
                              what=(backend, method, seed))
        assert_metrics_like_two_pass(one, run(logits, labels, old, adv, mask, backend=backend, one_launch=False,
                                              **kw, **extra))


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_ratio_clamp_and_normalizer(backend, monkeypatch):
    """Clamped log-ratios (zero gradient outside the clamp), an explicit and a zero normaliser."""
    logits, labels, old, ref, adv, mask, isw = make_case(3, 6, 41, seed=3)
    methods = ("grpo", "gppo", "cispo", "ecpo") if backend == "cpu" else ("gppo", "ecpo")
    for extra in ({"ratio_log_clamp": 0.3}, {"ratio_log_clamp": None}, {"normalizer": 7.0},
                  {"normalizer": torch.tensor(11.0)}, {"normalizer": 0.0}):
        for method in methods:
            kw = {**kwargs_for(method, "k3", 0.01, "seq-mean-token-mean", ref, isw, 6, use_is=True), **extra}
            one = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, monkeypatch=monkeypatch,
                      **kw)
            assert one[3]
            okw = {**kw, "normalizer": float(kw["normalizer"])} if "normalizer" in kw else kw
            assert_matches_oracle(one, oracle_for(logits, labels, old, adv, mask, **okw), torch.float32,
                                  what=(method, extra))
            if extra.get("normalizer") == 0.0:
                assert one[0].item() == 0.0 and not one[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_packed_and_inplace(backend, monkeypatch):
    """old_logp=None, the packed [N, V] layout with cu_seqlens, and inplace_grad (the gradient is
    written into the logits buffer itself)."""
    logits, labels, old, ref, adv, mask, isw = make_case(2, 10, 53, seed=9)
    logits, labels, old, ref, mask = logits[0], labels[0], old[0], ref[0], mask[0]
    labels[9] = -100
    cu = torch.tensor([0, 3, 3, 7, 10])
    adv_rows = torch.tensor([0.5, -1.0, 0.0, 2.0])
    kw = dict(method="grpo", cu_seqlens=cu, ref_logp=ref, kl_coef=0.1, kl_estimator="k3",
              entropy_coef=0.01, agg="seq-mean-token-mean")
    for old_logp in (None, old):
        one = run(logits, labels, old_logp, adv_rows, mask, backend=backend, one_launch=True,
                  monkeypatch=monkeypatch, **kw)
        assert one[3]
        assert_matches_oracle(one, oracle_for(logits, labels, old_logp, adv_rows, mask, **kw), torch.float32,
                              entropy=True, kl="k3", ref=ref, mask=mask, labels=labels)
    o = oracle_for(logits, labels, old, adv_rows, mask, **kw)
    dev = device_of(backend)
    leaf = logits.detach().to(dev).clone().requires_grad_()
    buf = leaf * 1
    upstream = []
    buf.register_hook(upstream.append)
    out = ao.fused_policy_loss(buf, labels.to(dev), old.to(dev), adv_rows.to(dev), mask.to(dev), backend=backend,
                               temperature=TEMPERATURE, grad_in_forward=True, inplace_grad=True, **kw_on(dev, kw))
    out.loss.backward()
    assert upstream[0].data_ptr() == buf.data_ptr()
    assert_matches_oracle((out.loss.detach().cpu(), leaf.grad.cpu(), kw_on("cpu", out.metrics), True), o,
                          torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab(backend, monkeypatch):
    """Real vocabularies (not multiples of any tile), peaked rows, one ignored row."""
    vocabs = (151936, 129920) if backend == "cpu" else (129920,)
    for V in vocabs:
        T = 3 if backend == "cpu" else 2
        logits, labels, old, ref, adv, mask, isw = make_case(1, T, V, seed=V % 101, pattern="peaked")
        kw = kwargs_for("dapo", "k3", 0.01, "token-mean", ref, isw, T, use_is=True)
        one = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, monkeypatch=monkeypatch, **kw)
        assert one[3]
        assert_matches_oracle(one, oracle_for(logits, labels, old, adv, mask, **kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_is_the_kernels(backend, monkeypatch):
    """The returned loss and pg_loss are the kernel's loss_terms and pg_terms, summed: a change
    to them shows up in the result (they were once filled and never read)."""
    logits, labels, old, ref, adv, mask, isw = make_case(2, 3, 17, seed=6)
    kw = dict(method="grpo", ref_logp=ref, kl_coef=0.1, entropy_coef=0.01)
    base = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, **kw)
    real = _backend.kernel("policy_loss_fused", backend)

    def shifted(*args):
        real(*args)
        loss_terms, pg_terms = args[-3], args[-2]
        loss_terms[0] += 0.5
        pg_terms[0] += 0.25
    monkeypatch.setitem(_backend._KERNEL_CACHE, ("policy_loss_fused", backend), shifted)
    moved = run(logits, labels, old, adv, mask, backend=backend, one_launch=True, **kw)
    assert abs((moved[0] - base[0]).item() - 0.5) < 1e-6
    assert abs((moved[2]["pg_loss"] - base[2]["pg_loss"]).item() - 0.25) < 1e-6
    assert torch.equal(moved[1], base[1])


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
    torch.testing.assert_close(one[0], two[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(one[1], two[1], rtol=1e-5, atol=1e-6 * two[1].abs().max().item())
    assert_metrics_like_two_pass(one, two)


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
def test_everything_masked_is_zero(backend, monkeypatch):
    """Nothing masked in, on the one-launch route (its kernel launched): loss, gradient and every
    metric exactly 0."""
    logits, labels, old, ref, adv, mask, isw = make_case(2, 3, 17, seed=4)
    real = _backend.kernel("policy_loss_fused", backend)
    launches = []

    def counted(*args):
        launches.append(1)
        return real(*args)
    monkeypatch.setitem(_backend._KERNEL_CACHE, ("policy_loss_fused", backend), counted)
    loss, grad, metrics, ran = run(logits, labels, old, adv, torch.zeros_like(mask), backend=backend,
                                   one_launch=True, monkeypatch=monkeypatch, method="grpo", ref_logp=ref,
                                   kl_coef=0.1, entropy_coef=0.01)
    assert ran and launches, (ran, len(launches))
    assert loss.item() == 0.0
    assert not grad.any()
    assert {"pg_loss", "kl", "entropy", "approx_kl", "ratio/mean", "ratio/max"} <= set(metrics)
    assert all(v.item() == 0.0 for v in metrics.values()), metrics
