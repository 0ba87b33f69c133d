"""The fused lm_head (alignops.fused_linear): every objective from hidden states and the lm_head weight.

Held to two references on the same rounded inputs:
    - float64 oracles written for the tests (tests/policy_oracle.py: plain torch math on the float64
      logits h @ W.T + b, gradients w.r.t. hidden, weight and bias by autograd), and
    - the logits path of alignops itself (token_logprobs / fused_policy_loss / sequence_logprobs /
      sft_loss on the materialised logits), which the fused lm_head must equal in value and
      gradient: the same kernels on the same tiles, so only the GEMMs' chunking differs.
Shapes are small (without a GPU the triton backend runs in the interpreter); vocabularies are primes
or 129920, never a multiple of a tile, and chunk sizes leave a ragged last chunk. Each backend runs
on its device (tests.conftest.device_of: torch and cpu on CPU tensors, cuda and, where there is a
GPU, triton on CUDA tensors): inputs are drawn on CPU and moved for the op; what is compared with
the float64 oracles is brought back to CPU.
"""
from __future__ import annotations

import pytest
import torch

import alignops as ao
from alignops.logits.sources import LinearHead
from alignops.policy import fused as policy_fused
from alignops.policy import METHODS
from tests import policy_oracle as oracle
from tests.conftest import backends_for, device_of, fast_backends

BACKENDS = ["torch"] + fast_backends()
# the interpreter is slow: interpreted triton (no GPU) gets the small cases only
FAST = [b for b in BACKENDS if not (b == "triton" and device_of(b) == "cpu")]
# float64 hidden states run on the torch and cpu backends (triton and cuda raise TypeError)
F64 = [b for b in BACKENDS if b in ("torch", "cpu")]
TEMPERATURE = 0.7


def to(device, *xs):
    """`xs` moved to `device` (None stays None): inputs are drawn on CPU, then moved for the op."""
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)


def case(N=11, H=8, V=1031, dtype=torch.float32, seed=0, bias=True, peaked=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if peaked:  # the label's logit ~ +50 above the rest: logp ~ 0, p ~ 1 exactly in fp32
        W[y[0]] = h[0] / h[0].norm() ** 2 * 50
    y[min(3, N - 1)] = -100
    return h.to(dtype), W.to(dtype), None if b is None else b.to(dtype), y


def leaves(*xs, device="cpu"):
    return [None if x is None else x.detach().to(device).clone().requires_grad_() for x in xs]


def grads(xs):
    """The leaves' gradients, on CPU."""
    return [None if x is None or x.grad is None else x.grad.cpu() for x in xs]


def logits_of(h, W, b):
    z = h @ W.T
    return z if b is None else z + b


def assert_grads_close(got, want, rtol, what=""):
    for name, g, w in zip(("dhidden", "dweight", "dbias"), got, want):
        if w is None:
            assert g is None, (what, name)
            continue
        scale = w.abs().max().item()
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=rtol * scale, msg=f"{what} {name}")


# --------------------------------------------------------------------------------------------
# token log-probs and entropy


# fp32 on every backend, fp64 on those that run it
DTYPE_CASES = [pytest.param(dtype, backend, id=f"{name}-{backend}")
               for name, dtype, backends in (("fp32", torch.float32, BACKENDS), ("fp64", torch.float64, F64))
               for backend in backends]


@pytest.mark.parametrize("dtype,backend", DTYPE_CASES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("peaked", [False, True], ids=["normal", "peaked"])
def test_token_logprobs_against_float64_oracle(backend, dtype, bias, peaked):
    dev = device_of(backend)
    h, W, b, y = case(dtype=dtype, bias=bias, peaked=peaked)
    ph, pW, pb = leaves(h, W, b, device=dev)
    lp, ent = ao.fused_linear_token_logprobs(ph, pW, y.to(dev), pb, temperature=TEMPERATURE, compute_entropy=True,
                                             backend=backend, chunk_size=4)
    (lp.sum() + 0.3 * ent.sum()).backward()
    lp, ent = lp.detach().cpu(), ent.detach().cpu()

    oh, oW, ob = leaves(*(None if x is None else x.double() for x in (h, W, b)))
    z = logits_of(oh, oW, ob)
    valid = oracle.valid_positions(y, None)
    want_lp, want_ent = oracle.token_stats(z, y, TEMPERATURE, valid)
    (want_lp.sum() + 0.3 * want_ent.sum()).backward()

    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.all(lp[~valid] == 0) and torch.all(ent[~valid] == 0)
    # fp32: the GEMM rounds each logit by ~eps * |z| sqrt(H); that is what moves logp and H
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    zmax = z.detach().abs().max().item() / TEMPERATURE
    torch.testing.assert_close(lp.double(), want_lp.detach(), rtol=0, atol=tol * (1 + zmax))
    torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=0, atol=tol * (1 + zmax))
    assert_grads_close(grads((ph, pW, pb)), grads((oh, oW, ob)), tol * 10 if dtype == torch.float32 else tol,
                       (backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["none", "softcap", "scale", "both"])
def test_token_logprobs_equal_the_logits_path(backend, transform):
    """Value and gradients equal token_logprobs on transform(h @ W.T + b), the transform in fp32."""
    h, W, b, y = case(N=9, V=211 if backend == "triton" else 1031)
    dev = device_of(backend)
    y = y.to(dev)
    softcap = 3.0 if transform in ("softcap", "both") else None
    scale = 0.8 if transform in ("scale", "both") else None
    ph, pW, pb = leaves(h, W, b, device=dev)
    lp, ent = ao.fused_linear_token_logprobs(ph, pW, y, pb, temperature=TEMPERATURE, compute_entropy=True,
                                             softcap=softcap, logit_scale=scale, backend=backend, chunk_size=4)
    (lp.sum() - 0.5 * ent.sum()).backward()
    qh, qW, qb = leaves(h, W, b, device=dev)
    z = logits_of(qh, qW, qb)
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp2, ent2 = ao.token_logprobs(z, y, temperature=TEMPERATURE, compute_entropy=True, backend=backend)
    (lp2.sum() - 0.5 * ent2.sum()).backward()
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads((ph, pW, pb)), grads((qh, qW, qb)), 1e-5, (backend, transform))


@pytest.mark.parametrize("backend", FAST)
def test_vocabulary_129920(backend):
    h, W, b, y = case(N=6, H=4, V=129920, bias=False)
    dev = device_of(backend)
    y = y.to(dev)
    ph, pW = leaves(h.float(), W.float(), device=dev)
    lp = ao.fused_linear_token_logprobs(ph, pW, y, temperature=TEMPERATURE, backend=backend, chunk_size=4)
    lp.sum().backward()
    qh, qW = leaves(h.float(), W.float(), device=dev)
    lp2 = ao.token_logprobs(qh @ qW.T, y, temperature=TEMPERATURE, backend=backend)
    lp2.sum().backward()
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    assert_grads_close((ph.grad, pW.grad, None), (qh.grad, qW.grad, None), 1e-5, backend)


def verl_kernel_case(N, H, V, dtype, seed=0):
    """verl's test_linear_cross_entropy.py inputs, at a smaller H with the logits' spread kept: its
    hidden and weight are uniform in [-0.5, 0.5] at H = 896 (logits of std ~2.5); here the weight's
    range grows by sqrt(896 / H). Labels uniform, upstream gradients uniform in [-1, 1] (log-probs)
    and [-0.5, 0.5] (entropy)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.rand(N, H, generator=g) - 0.5).to(dtype)
    W = ((torch.rand(V, H, generator=g) - 0.5) * (896 / H) ** 0.5).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    g_lp = torch.rand(N, generator=g) * 2 - 1
    g_ent = torch.rand(N, generator=g) - 0.5
    return h, W, y, g_lp, g_ent


# verl's tolerances for its fused kernel against its fp32 reference (tests/utils/test_linear_cross_entropy.py,
# verl 0.9.1), held here against float64 on the same rounded inputs
VERL_LOGP, VERL_ENTROPY, VERL_GRAD = dict(atol=1e-3, rtol=2e-4), dict(atol=5e-3, rtol=5e-4), dict(atol=2e-2, rtol=4e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("V", [151936, 32256])
def test_half_precision_meets_verl_kernel_tolerance(backend, dtype, V):
    """bf16/fp16 hidden states and weight: the logits tile is the GEMM's fp32 accumulator, so
    log-probs, entropy and both gradients meet verl's kernel tolerances against float64 (rounding
    the tile to bf16 misses them by ~10x: log-prob error ~1e-2 at |logp| ~ 12)."""
    N = 3 if backend == "triton" and device_of(backend) == "cpu" else 8
    h, W, y, g_lp, g_ent = verl_kernel_case(N, 96, V, dtype)
    T = 1.5
    dev = device_of(backend)
    ph, pW = leaves(h, W, device=dev)
    lp, ent = ao.fused_linear_token_logprobs(ph, pW, y.to(dev), temperature=T, compute_entropy=True,
                                             backend=backend)
    torch.autograd.backward((lp, ent), (g_lp.to(dev), g_ent.to(dev)))
    oh, oW = leaves(h.double(), W.double())
    want_lp, want_ent = oracle.token_stats(oh @ oW.T, y, T, torch.ones(N, dtype=torch.bool))
    torch.autograd.backward((want_lp, want_ent), (g_lp.double(), g_ent.double()))
    assert lp.dtype == torch.float32 and ph.grad.dtype == dtype and pW.grad.dtype == dtype
    torch.testing.assert_close(lp.cpu().double(), want_lp.detach(), **VERL_LOGP)
    torch.testing.assert_close(ent.cpu().double(), want_ent.detach(), **VERL_ENTROPY)
    # and what an fp32 tile gives (measured ~1e-6 at |logp| ~ 18): a tile rounded to fp16 is ~1e-3 off
    torch.testing.assert_close(lp.cpu().double(), want_lp.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.cpu().double(), want_ent.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(ph.grad.cpu().double(), oh.grad, **VERL_GRAD)
    torch.testing.assert_close(pW.grad.cpu().double(), oW.grad, **VERL_GRAD)


@pytest.mark.parametrize("backend", [b for b in FAST if b in F64])
def test_gradcheck_float64(backend):
    h, W, b, y = case(N=5, H=3, V=7, dtype=torch.float64)
    dev = device_of(backend)
    y = y.to(dev)
    ph, pW, pb = leaves(h, W, b, device=dev)

    def f(h_, W_, b_):
        lp, ent = ao.fused_linear_token_logprobs(h_, W_, y, b_, temperature=TEMPERATURE, compute_entropy=True,
                                                 softcap=2.5, backend=backend, chunk_size=2)
        return lp, ent
    assert torch.autograd.gradcheck(f, (ph, pW, pb), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FAST)
def test_frozen_weight_costs_no_dweight(backend, monkeypatch):
    """requires_grad=False on the weight (a frozen or LoRA'd head): no dweight accumulator, no GEMM."""
    seen = []
    real = LinearHead.start_grads

    def spy(self, want):
        seen.append(tuple(bool(w) for w in want))
        real(self, want)
    monkeypatch.setattr(LinearHead, "start_grads", spy)
    h, W, b, y = to(device_of(backend), *case())
    ph = h.clone().requires_grad_()
    lp = ao.fused_linear_token_logprobs(ph, W, y, b, temperature=TEMPERATURE, backend=backend, chunk_size=4)
    lp.sum().backward()
    assert seen == [(True, False, False)] and W.grad is None
    qh = h.clone().requires_grad_()
    ao.token_logprobs(logits_of(qh, W, b), y, temperature=TEMPERATURE, backend=backend).sum().backward()
    torch.testing.assert_close(ph.grad, qh.grad, rtol=1e-5, atol=1e-5 * qh.grad.abs().max().item())


@pytest.mark.parametrize("backend", FAST)
def test_tied_weight_accumulates_both_uses(backend):
    """lm_head tied to the embedding: the gradient of both uses lands in the one parameter."""
    torch.manual_seed(0)
    V, H = 97, 8
    dev = device_of(backend)
    emb = torch.nn.Embedding(V, H).to(dev)
    ids = torch.randint(0, V, (2, 6))
    y = torch.randint(0, V, (2, 6))
    y[1, 4:] = -100
    ids, y = to(dev, ids, y)

    def run(fused):
        emb.zero_grad(set_to_none=True)
        hidden = torch.tanh(emb(ids)) * 2
        if fused:
            lp = ao.fused_linear_token_logprobs(hidden, emb.weight, y, temperature=TEMPERATURE, backend=backend,
                                                chunk_size=5)
        else:
            lp = ao.token_logprobs(hidden @ emb.weight.T, y, temperature=TEMPERATURE, backend=backend)
        lp.sum().backward()
        return lp.detach(), emb.weight.grad.clone()
    lp1, g1 = run(True)
    lp2, g2 = run(False)
    torch.testing.assert_close(lp1, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5 * g2.abs().max().item())


# --------------------------------------------------------------------------------------------
# policy losses


def policy_case(B=3, T=5, H=8, V=211, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) / H ** 0.5 * 2
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, -1] = -100
    with torch.no_grad():
        lp = ao.token_logprobs(h @ W.T, y, temperature=TEMPERATURE, backend="torch")
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    adv[1] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.2
    return h, W, y, old, ref, adv, mask


METHOD_CASES = [(name, i) for name, m in sorted(METHODS.items()) for i in range(len(m.examples))]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("method,example", METHOD_CASES, ids=[f"{n}-{i}" for n, i in METHOD_CASES])
def test_every_method_equals_the_logits_path(backend, method, example):
    """Every registry entry and each of its examples: the recompute path and the terminal
    (grad-in-forward) path against fused_policy_loss on the logits, loss, metrics and gradients."""
    h, W, y, old, ref, adv, mask = to(device_of(backend), *policy_case())
    kw = dict(method=method, temperature=TEMPERATURE, ref_logp=ref, kl_coef=0.04, entropy_coef=0.01,
              max_len=5, **METHODS[method].examples[example])
    if method == "gpg" and "group_size" in kw:
        kw["group_size"] = 3
    kw = dict(zip(kw, to(h.device, *kw.values())))
    qh, qW = leaves(h, W, device=h.device)
    want = ao.fused_policy_loss(qh @ qW.T, y, old, adv, mask, backend=backend, **kw)
    want.loss.backward()
    for gif in (False, True):
        ph, pW = leaves(h, W, device=h.device)
        out = ao.fused_linear_policy_loss(ph, pW, y, old, adv, mask, backend=backend, grad_in_forward=gif,
                                          chunk_size=4, **kw)
        out.loss.backward()
        what = (backend, method, example, gif)
        torch.testing.assert_close(out.loss, want.loss, rtol=2e-5, atol=2e-6, msg=str(what))
        assert set(out.metrics) == set(want.metrics), what
        for k in want.metrics:
            torch.testing.assert_close(out.metrics[k], want.metrics[k], rtol=2e-5, atol=2e-6, msg=f"{what} {k}")
        assert_grads_close((ph.grad, pW.grad, None), (qh.grad, qW.grad, None), 2e-5, str(what))


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_against_float64_oracle_and_one_launch_ran(backend, monkeypatch):
    """GRPO with dual clip, k3 KL, entropy bonus, seq-mean-token-mean and mask=None (ignored labels
    are the only padding) against the float64 oracle, and the one-launch kernel ran on the tiles."""
    calls = []
    real = policy_fused.terminal_one_launch

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(policy_fused, "terminal_one_launch", spy)
    h, W, y, old, ref, adv, _ = policy_case(V=97 if backend == "triton" else 211)
    kw = dict(method="grpo", clip_ratio_c=3.0, ref_logp=ref, kl_coef=0.04, kl_estimator="k3", entropy_coef=0.01,
              agg="seq-mean-token-mean")
    dev = device_of(backend)
    ph, pW = leaves(h, W, device=dev)
    out = ao.fused_linear_policy_loss(ph, pW, *to(dev, y, old, adv), None, backend=backend, temperature=TEMPERATURE,
                                      grad_in_forward=True, chunk_size=4, **{**kw, "ref_logp": ref.to(dev)})
    out.loss.backward()
    assert bool(calls) == (backend in ("cpu", "triton"))
    oh, oW = leaves(h.double(), W.double())
    z = oh @ oW.T
    o = oracle.policy_loss(z, y, old, adv, None, temperature=TEMPERATURE, **kw)
    dz = o.grad.reshape(-1, z.shape[-1])
    want_dh = (dz @ oW.detach()).reshape(h.shape)
    want_dw = dz.T @ oh.detach().reshape(-1, h.shape[-1])
    scale = o.scale.item()
    assert abs(out.loss.item() - o.loss.item()) <= 1e-5 * scale + 1e-7, (out.loss.item(), o.loss.item())
    assert_grads_close(grads((ph, pW, None)), (want_dh, want_dw, None), 2e-5, backend)


@pytest.mark.parametrize("backend", FAST)
def test_packed_layout_and_frozen_head_terminal(backend):
    """Packed [N, H] hidden with cu_seqlens, a frozen weight and grad_in_forward: dhidden only."""
    h, W, y, old, ref, adv, mask = to(device_of(backend), *policy_case())
    B, T = y.shape
    cu = (torch.arange(B + 1) * T).to(h.device)
    kw = dict(method="dapo", ref_logp=ref.reshape(-1), kl_coef=0.04, cu_seqlens=cu, temperature=TEMPERATURE)
    ph = h.reshape(-1, h.shape[-1]).clone().requires_grad_()
    out = ao.fused_linear_policy_loss(ph, W, y.reshape(-1), old.reshape(-1), adv, mask.reshape(-1),
                                      backend=backend, grad_in_forward=True, chunk_size=4, **kw)
    out.loss.backward()
    qh = h.reshape(-1, h.shape[-1]).clone().requires_grad_()
    want = ao.fused_policy_loss(qh @ W.T, y.reshape(-1), old.reshape(-1), adv, mask.reshape(-1), backend=backend,
                                **kw)
    want.loss.backward()
    assert W.grad is None
    torch.testing.assert_close(out.loss, want.loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(ph.grad, qh.grad, rtol=2e-5, atol=2e-5 * qh.grad.abs().max().item())


# --------------------------------------------------------------------------------------------
# sequence log-probs and SFT


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sequence_logprobs_and_sft_equal_the_logits_path(backend, packed):
    h, W, y, _, _, _, mask = policy_case()
    B, T = y.shape
    cu = torch.arange(B + 1) * T if packed else None
    if packed:
        h, y, mask = h.reshape(-1, h.shape[-1]), y.reshape(-1), mask.reshape(-1)
    dev = device_of(backend)
    y, mask, cu = to(dev, y, mask, cu)
    row_w = torch.arange(1.0, B + 1).to(dev)
    for reduction in ("sum", "mean"):
        ph, pW = leaves(h, W, device=dev)
        s = ao.fused_linear_sequence_logprobs(ph, pW, y, mask, reduction, cu_seqlens=cu, temperature=TEMPERATURE,
                                              backend=backend, chunk_size=4)
        (s * row_w).sum().backward()
        qh, qW = leaves(h, W, device=dev)
        s2 = ao.sequence_logprobs(qh @ qW.T, y, mask, reduction, cu_seqlens=cu, temperature=TEMPERATURE,
                                  backend=backend)
        (s2 * row_w).sum().backward()
        torch.testing.assert_close(s, s2, rtol=1e-5, atol=1e-5)
        assert_grads_close((ph.grad, pW.grad, None), (qh.grad, qW.grad, None), 2e-5, (backend, reduction))
    ph, pW = leaves(h, W, device=dev)
    out = ao.fused_linear_sft_loss(ph, pW, y, mask, weighting="dft", cu_seqlens=cu, temperature=TEMPERATURE,
                                   backend=backend, chunk_size=4)
    out.loss.backward()
    qh, qW = leaves(h, W, device=dev)
    want = ao.sft_loss(qh @ qW.T, y, mask, weighting="dft", cu_seqlens=cu, temperature=TEMPERATURE, backend=backend)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    for k in want.metrics:
        torch.testing.assert_close(out.metrics[k], want.metrics[k], rtol=1e-5, atol=1e-6, msg=k)
    assert_grads_close((ph.grad, pW.grad, None), (qh.grad, qW.grad, None), 2e-5, backend)


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_argument():
    h, W, b, y = case()
    with pytest.raises(ValueError, match="weight must be"):
        ao.fused_linear_token_logprobs(h, W.T, y)
    # what a DeepSpeed ZeRO-3 parameter looks like outside its module's forward
    with pytest.raises(ValueError, match=r"weight must be .* got shape \(0,\) \(an empty weight: a DeepSpeed ZeRO-3"):
        ao.fused_linear_token_logprobs(h, W.new_empty(0), y)
    with pytest.raises(TypeError, match="weight dtype"):
        ao.fused_linear_token_logprobs(h, W.double(), y)
    with pytest.raises(ValueError, match="labels shape"):
        ao.fused_linear_token_logprobs(h, W, y[:-1])
    with pytest.raises(ValueError, match="bias must be"):
        ao.fused_linear_token_logprobs(h, W, y, b[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        ao.fused_linear_token_logprobs(h, W, y, chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        ao.fused_linear_token_logprobs(h, W, y, softcap=0.0)
    with pytest.raises(ValueError, match="labels must lie"):
        ao.fused_linear_token_logprobs(h, W, torch.full_like(y, W.shape[0]))
    with pytest.raises(TypeError, match="hidden must be"):
        ao.fused_linear_token_logprobs(h.int(), W, y)
    h2, W2, y2, old, ref, adv, mask = policy_case()
    with pytest.raises(ValueError, match="unknown method"):
        ao.fused_linear_policy_loss(h2, W2, y2, old, adv, mask, method="nope")


def test_dtensor_head_is_refused_by_name(tmp_path):
    """An FSDP2 shard handed over as the weight (or the hidden states) is named, not left to aten's mixed-tensor
    error deep inside the GEMM."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        h, W, b, y = case()
        with pytest.raises(TypeError, match="weight is a DTensor"):
            ao.fused_linear_token_logprobs(h, distribute_tensor(W, mesh, [Shard(0)]), y)
        with pytest.raises(TypeError, match="hidden is a DTensor"):
            ao.fused_linear_token_logprobs(distribute_tensor(h, mesh, [Shard(0)]), W, y)
    finally:
        dist.destroy_process_group()


def test_empty_and_all_masked_batches_are_finite():
    h, W, b, y = case(N=4)
    ph = h[:0].clone().requires_grad_()
    lp = ao.fused_linear_token_logprobs(ph, W, y[:0], backend="torch")
    lp.sum().backward()
    assert lp.shape == (0,) and ph.grad.shape == (0, h.shape[1])
    h2, W2, y2, old, ref, adv, mask = policy_case()
    pW = W2.clone().requires_grad_()
    out = ao.fused_linear_policy_loss(h2, pW, y2, old, adv, torch.zeros_like(mask), grad_in_forward=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(pW.grad == 0)


# --------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_against_float64(backend, dtype):
    """GRPO (+ KL, entropy bonus) on CUDA tensors, V = 151936, both routes held to the float64 oracle
    on the same rounded inputs: loss, dhidden and dweight (bf16: the fp32 tile, at verl's kernel
    tolerance for the gradients)."""
    if backend not in backends_for("cuda"):
        pytest.skip(f"{backend} is not available on CUDA here")
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 96, 256, 151936
    h = torch.randn(B, T, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) / H ** 0.5 * 2).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, -5:] = -100
    z64 = h.double() @ W.double().T
    lp = oracle.token_stats(z64, y, TEMPERATURE, y != -100)[0].float()
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    kw = dict(method="grpo", temperature=TEMPERATURE, ref_logp=old - 0.05, kl_coef=0.04, entropy_coef=0.01)
    want = oracle.policy_loss(z64, y, old, adv, None, **kw)
    G = want.grad.reshape(-1, V)
    want_dh, want_dW = (G @ W.double()).reshape(B, T, H), G.T @ h.double().reshape(-1, H)
    kw["ref_logp"] = kw["ref_logp"].cuda()
    for gif in (False, True):
        ph, pW = leaves(h, W, device="cuda")
        out = ao.fused_linear_policy_loss(ph, pW, y.cuda(), old.cuda(), adv.cuda(), None, backend=backend,
                                          grad_in_forward=gif, **kw)
        out.loss.backward()
        torch.testing.assert_close(out.loss.cpu().double(), want.loss, rtol=0, atol=1e-5 * want.scale)
        for got, ref in ((ph.grad, want_dh), (pW.grad, want_dW)):
            if dtype == torch.float32:
                torch.testing.assert_close(got.cpu().double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
            else:
                torch.testing.assert_close(got.cpu().double(), ref, **VERL_GRAD)


@pytest.mark.parametrize("backend", FAST)
def test_terminal_gradients_scale_with_grad_output(backend):
    """grad_in_forward stores the gradients for grad_output = 1 and scales them in backward."""
    h, W, y, old, ref, adv, mask = to(device_of(backend), *policy_case())
    got = []
    for factor in (1.0, -2.5):
        ph, pW = leaves(h, W, device=h.device)
        out = ao.fused_linear_policy_loss(ph, pW, y, old, adv, mask, backend=backend, grad_in_forward=True,
                                          temperature=TEMPERATURE, chunk_size=4)
        (factor * out.loss).backward()
        got.append((ph.grad, pW.grad))
    torch.testing.assert_close(got[1][0], -2.5 * got[0][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1][1], -2.5 * got[0][1], rtol=1e-6, atol=0)
