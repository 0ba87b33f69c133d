"""mask=None means labels != ignore_index, everywhere a mask and labels meet.

For every op that takes logits, labels and a mask (fused_policy_loss with each of its options,
sft_loss, sequence_logprobs and the preference losses on top of it: dpo_loss, orpo_loss), on every
backend that runs here, each on its device (tests.conftest.device_of: torch and cpu on CPU tensors;
triton compiled on CUDA tensors where there is a GPU, else interpreted on small shapes; cuda where
there is a GPU), in the [B, T] and the packed (cu_seqlens) layouts: mask=None, mask=ones and
mask=(labels != ignore_index) give the same loss and the same gradient w.r.t. the logits, and both
match a float64 oracle (tests/policy_oracle.py: torch float64 math on the same inputs, on CPU,
sharing no code with alignops). Inputs are off-policy (old_logp != logp, and junk old log-probs at
the ignored positions, where the kernels' logp is 0), with ignored labels scattered and one row
fully ignored, and a non-default ignore_index some of the time.

(Before the fix, fused_policy_loss took mask=None as all ones: the ignored positions entered the
loss with logp = 0 against their old_logp, and the fully ignored row counted as a sequence.)
"""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import alignops as ao
from tests import policy_oracle as oracle
from tests.conftest import device_of, fast_backends

pl = importlib.import_module("alignops.policy.fused")  # its terminal_one_launch is the one-launch route
BACKENDS = ["torch"] + fast_backends()
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
METHODS = ["grpo", "dapo", "gppo", "cispo", "reinforce", "ecpo"]
OPTIONS = {"default": {}, "grad_in_forward": {"grad_in_forward": True}, "inplace_grad": {"inplace_grad": True},
           "both": {"grad_in_forward": True, "inplace_grad": True}}
MASKS = ("none", "ones", "valid")
# Triton: fewer examples, as many on a GPU as interpreted without one, where it is slow (the shapes
# below are already small).
EXAMPLES = {"triton": 8}


def on(device, x):
    """`x` on `device`: a tensor moved (None and other values as they are). Inputs are drawn on CPU
    (CPU generators) and the float64 oracle runs on those CPU tensors."""
    return x.to(device) if isinstance(x, torch.Tensor) else x


def kw_on(device, kw):
    return {k: on(device, v) for k, v in kw.items()}


@st.composite
def batches(draw, packed=False, even_rows=False):
    """A dict of inputs: logits [B, T, V] (or packed [N, V] + cu_seqlens), labels with ignored
    positions and one fully ignored row, off-policy old_logp, ref_logp, per-row advantages."""
    rows = draw(st.integers(1, 2)) * 2 if even_rows else draw(st.integers(1, 3))
    V = draw(st.integers(2, 13))
    ignore_index = draw(st.sampled_from([-100, -100, -1]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    temperature = draw(st.sampled_from([1.0, 0.7, 1.6]))
    ignore_frac = draw(st.sampled_from([0.0, 0.3, 0.6]))
    if packed:
        lengths = [draw(st.integers(0, 4)) for _ in range(rows)]
        n = sum(lengths)
        cu = torch.tensor([0] + lengths).cumsum(0)
        shape = (n,)
    else:
        T = draw(st.integers(1, 5))
        shape = (rows, T)
        cu = None
    logits = (torch.randn(*shape, V, generator=gen, dtype=torch.float64) * 2).float()
    labels = torch.randint(0, V, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = ignore_index
    dead = draw(st.integers(0, rows - 1))  # a fully ignored row
    if packed:
        labels[int(cu[dead]):int(cu[dead + 1])] = ignore_index
    else:
        labels[dead] = ignore_index
    valid = labels != ignore_index
    with torch.no_grad():
        lp = torch.log_softmax(logits.double() / temperature, -1).gather(
            -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    # off-policy everywhere; at ignored positions a junk old log-prob far from the kernels' 0
    old = torch.where(valid, lp + 0.3 * noise, -4.0 + noise).float()
    ref = torch.where(valid, lp + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64), 2.0).float()
    adv = torch.randn(rows, generator=gen)
    return dict(logits=logits, labels=labels, old=old, ref=ref, adv=adv, cu_seqlens=cu,
                temperature=temperature, ignore_index=ignore_index)


def masks_for(labels, ignore_index):
    return {"none": None, "ones": torch.ones(labels.shape, dtype=torch.bool),
            "valid": labels != ignore_index}


def grad_of(fn, logits, inplace=False, device="cpu"):
    """(loss, dloss/dlogits) of fn(logits) with the logits on `device`, both brought back to CPU;
    with inplace, through a non-leaf buffer that the op may overwrite (as logits from an lm_head are)."""
    leaf = logits.detach().to(device).clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    loss = fn(x)
    loss.backward()
    return loss.detach().cpu(), leaf.grad.cpu()


def assert_same_across_masks(results, what):
    """mask=None, ones and labels != ignore_index: the same computation, bit for bit."""
    (l0, g0) = results["none"]
    for k in ("ones", "valid"):
        lk, gk = results[k]
        assert torch.equal(lk, l0), (what, k, lk.item(), l0.item())
        assert torch.equal(gk, g0), (what, k, (gk - g0).abs().max().item())


def assert_close_to(loss, grad, want_loss, want_grad, scale, coef, what, logp_sensitivity=0.0):
    """float32 results vs the float64 oracle: 1e-5 of the size of the terms (they may cancel) and
    of the largest gradient entry or per-token coefficient, plus what four float32 roundings of
    logp move the gradient by (the oracle's logp_sensitivity: a KL term's dL/dlogp is a difference
    logp - ref, so near ref its rounding is absolute; hypothesis found ref within 3e-3 of logp)."""
    err = abs(loss.double().item() - want_loss.item())
    assert err <= 1e-5 * scale + 1e-7, (what, loss.item(), want_loss.item(), err, scale)
    gmax = max(want_grad.abs().max().item() if want_grad.numel() else 0.0, coef)
    atol = 1e-5 * gmax + 4 * torch.finfo(torch.float32).eps * logp_sensitivity + 1e-9
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=atol, msg=str(what))


# --------------------------------------------------------------------------------------------
# fused_policy_loss


def policy_kwargs(data, draw):
    method = draw(st.sampled_from(METHODS))
    kw = {"method": method, "agg": draw(st.sampled_from(AGGS)), "max_len": 5,
          "entropy_coef": draw(st.sampled_from([0.0, 0.01]))}
    if draw(st.booleans()):
        kw.update(ref_logp=data["ref"], kl_coef=0.05, kl_estimator=draw(st.sampled_from(
            ["k1", "k2", "k3", "low_var_kl"])))
    if data["cu_seqlens"] is not None:
        kw["cu_seqlens"] = data["cu_seqlens"]
    return kw


def check_policy(backend, option, data, kw):
    logits, labels, ii = data["logits"], data["labels"], data["ignore_index"]
    opts = OPTIONS[option]
    dev = device_of(backend)
    labels_d, old_d, adv_d, kw_d = on(dev, labels), on(dev, data["old"]), on(dev, data["adv"]), kw_on(dev, kw)
    results = {}
    for name, mask in masks_for(labels, ii).items():
        results[name] = grad_of(lambda x, m=on(dev, mask): ao.fused_policy_loss(
            x, labels_d, old_d, adv_d, m, backend=backend, temperature=data["temperature"],
            ignore_index=ii, **opts, **kw_d).loss, logits, inplace=opts.get("inplace_grad", False), device=dev)
    what = (backend, option, kw.get("method"), kw.get("agg"), kw.get("kl_estimator"))
    assert_same_across_masks(results, what)
    o = oracle.policy_loss(logits, labels, data["old"], data["adv"], None, temperature=data["temperature"],
                           ignore_index=ii, **kw)
    assert_close_to(*results["none"], o.loss, o.grad, o.scale.item(), o.coef.item(), what,
                    o.logp_sensitivity.item())


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_policy_loss(backend, option):
    @settings(max_examples=EXAMPLES.get(backend, 25))
    @given(data=batches(), draw=st.data())
    def inner(data, draw):
        check_policy(backend, option, data, policy_kwargs(data, draw.draw))
    inner()


@pytest.mark.parametrize("option", ["default", "grad_in_forward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_policy_loss_packed(backend, option):
    @settings(max_examples=EXAMPLES.get(backend, 25))
    @given(data=batches(packed=True), draw=st.data())
    def inner(data, draw):
        check_policy(backend, option, data, policy_kwargs(data, draw.draw))
    inner()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "triton")])
def test_one_launch_kernel_runs_with_mask_none(backend, monkeypatch):
    """mask=None reaches the one-launch kernel (not a fallback) and counts only the valid labels."""
    calls = []
    real = pl.terminal_one_launch

    def spy(*args, **kwargs):
        calls.append(args[2].mask)  # the mask the kernel gets: the prepared call's
        return real(*args, **kwargs)
    monkeypatch.setattr(pl, "terminal_one_launch", spy)
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen).to(dev).requires_grad_()
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    labels[0, 3:] = -100
    labels[1] = -100
    old = torch.randn(2, 6, generator=gen) - 2
    out = ao.fused_policy_loss(logits, labels.to(dev), old.to(dev), torch.tensor([1.0, -0.5]).to(dev), None,
                               backend=backend, grad_in_forward=True, agg="seq-mean-token-mean")
    assert calls and calls[0].device == logits.device and torch.equal(calls[0].cpu(), labels != -100)
    o = oracle.policy_loss(logits.cpu(), labels, old, torch.tensor([1.0, -0.5]), None, agg="seq-mean-token-mean")
    assert abs(out.loss.item() - o.loss.item()) <= 1e-5 * o.scale.item()


# --------------------------------------------------------------------------------------------
# sft_loss, sequence_logprobs, and the preference losses on sequence log-probs


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_loss(backend, packed):
    @settings(max_examples=EXAMPLES.get(backend, 25))
    @given(data=batches(packed=packed), weighting=st.sampled_from(["none", "dft"]))
    def inner(data, weighting):
        logits, labels, ii = data["logits"], data["labels"], data["ignore_index"]
        kw = dict(temperature=data["temperature"], ignore_index=ii, cu_seqlens=data["cu_seqlens"])
        dev = device_of(backend)
        labels_d, kw_d = on(dev, labels), kw_on(dev, kw)
        results = {name: grad_of(lambda x, m=on(dev, m): ao.sft_loss(x, labels_d, m, weighting, backend=backend,
                                                                      **kw_d).loss, logits, device=dev)
                   for name, m in masks_for(labels, ii).items()}
        assert_same_across_masks(results, (backend, weighting))
        want, want_grad = oracle.sft_loss(logits, labels, None, weighting=weighting, **kw)
        n = max(int((labels != ii).sum()), 1)
        assert_close_to(*results["none"], want, want_grad, abs(want.item()), 1.0 / n, (backend, weighting))
    inner()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs(backend, packed):
    @settings(max_examples=EXAMPLES.get(backend, 25))
    @given(data=batches(packed=packed), reduction=st.sampled_from(["sum", "mean"]),
           row_weights=st.lists(st.floats(-2, 2), min_size=4, max_size=4))
    def inner(data, reduction, row_weights):
        logits, labels, ii = data["logits"], data["labels"], data["ignore_index"]
        kw = dict(temperature=data["temperature"], ignore_index=ii, cu_seqlens=data["cu_seqlens"])
        rows = data["adv"].numel()
        w = torch.tensor(row_weights[:rows])
        dev = device_of(backend)
        labels_d, kw_d, w_d = on(dev, labels), kw_on(dev, kw), on(dev, w)
        results, lengths = {}, {}
        for name, m in masks_for(labels, ii).items():
            def fn(x, m=on(dev, m), name=name):
                s, n = ao.sequence_logprobs(x, labels_d, m, reduction, backend=backend, return_lengths=True, **kw_d)
                lengths[name] = n.cpu()
                return (w_d * s).sum()
            results[name] = grad_of(fn, logits, device=dev)
        assert_same_across_masks(results, (backend, reduction))
        for name in MASKS:
            assert torch.equal(lengths[name], lengths["none"])
        x64, sums, means, want_len = oracle.sequence_logprobs(logits, labels, None, **kw)
        target = (w.double() * (sums if reduction == "sum" else means)).sum()
        (want_grad,) = torch.autograd.grad(target, x64)
        assert torch.equal(lengths["none"].double(), want_len)
        scale = (w.double().abs() * (sums if reduction == "sum" else means).abs()).sum().item()
        assert_close_to(*results["none"], target.detach(), want_grad, scale, w.abs().max().item(), (backend,))
    inner()


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_preference_losses_on_sequence_logprobs(backend, loss):
    """dpo_loss / orpo_loss take sequence log-probs; the mask meets the labels in
    sequence_logprobs. Chosen rows are the even ones, rejected the odd ones.

    The sums S and lengths L are checked against the oracle's; the loss and its gradient against
    the oracle's loss evaluated at the op's own S (ORPO's log(1 - exp(S/L)) is ill-conditioned as
    S/L -> 0, where any float32 S carries a large relative error), chained through the oracle's
    dS/dlogits."""
    @settings(max_examples=EXAMPLES.get(backend, 25))
    @given(data=batches(even_rows=True))
    def inner(data):
        logits, labels, ii = data["logits"], data["labels"], data["ignore_index"]
        kw = dict(temperature=data["temperature"], ignore_index=ii)
        ref = data["adv"]  # any detached per-row numbers serve as reference sequence log-probs
        dev = device_of(backend)
        labels_d, ref_d = on(dev, labels), on(dev, ref)

        def pair_loss(s, n, lib):
            if lib is ao:
                if loss == "dpo":
                    return ao.dpo_loss(s[0::2], s[1::2], ref_d[0::2], ref_d[1::2], beta=0.5).loss
                return ao.orpo_loss(s[0::2], s[1::2], n[0::2], n[1::2], beta=0.5).loss
            if loss == "dpo":
                return oracle.dpo_sigmoid(s[0::2], s[1::2], ref[0::2].double(), ref[1::2].double(), 0.5)
            return oracle.orpo(s[0::2], s[1::2], n[0::2], n[1::2], 0.5)

        results, seqs = {}, {}
        for name, m in masks_for(labels, ii).items():
            def fn(x, m=on(dev, m), name=name):
                s, n = ao.sequence_logprobs(x, labels_d, m, backend=backend, return_lengths=True, **kw)
                seqs[name] = (s.detach().cpu(), n.cpu())
                return pair_loss(s, n, ao)
            results[name] = grad_of(fn, logits, device=dev)
        assert_same_across_masks(results, (backend, loss))
        for name in MASKS:
            assert torch.equal(seqs[name][0], seqs["none"][0]) and torch.equal(seqs[name][1], seqs["none"][1])
        s32, n = seqs["none"]
        x64, sums, _, lengths = oracle.sequence_logprobs(logits, labels, None, **kw)
        assert torch.equal(n.double(), lengths)
        torch.testing.assert_close(s32.double(), sums.detach(), rtol=1e-5, atol=1e-6)
        s_at = s32.double().requires_grad_()
        target = pair_loss(s_at, lengths, oracle)
        (g_s,) = torch.autograd.grad(target, s_at)
        (want_grad,) = torch.autograd.grad((g_s * sums).sum(), x64)
        assert_close_to(*results["none"], target.detach(), want_grad, abs(target.item()), g_s.abs().max().item(),
                        (backend, loss))
    inner()
