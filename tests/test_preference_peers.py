"""SimPO, CPO and KTO (docs/methods.md 2.37-2.39): simpo_loss, cpo_loss, kto_loss against the
float64 oracles of tests/preference_oracle.py and the sections' closed forms; the fused lm_head
versions (fused_linear_simpo_loss, fused_linear_cpo_loss, fused_linear_kto_loss) against the same
oracles on materialised float64 logits; and parity with the peers on the same hidden states and
weight, values and gradients (hidden, weight), fp32 on CPU:

- TRL 1.16: its own code, called without building a trainer. `CPOTrainer.get_batch_loss_metrics`
  (which runs `concatenated_forward`, `get_batch_logps`, the NLL and `cpo_loss`) and
  `KTOTrainer._compute_loss` (the KL estimate, its clamp, the weights, the mean) are called as
  unbound functions on a stand-in `self` holding the config fields, with a stand-in model that
  returns the logits (CPO) or the fused head's token log-probs (KTO) of `hidden @ weight.T`.
- Liger 0.8.5: LigerFusedLinearSimPOLoss, LigerFusedLinearCPOLoss, LigerFusedLinearKTOLoss
  (compiled=False: eager on CPU).

The peers' quirks are asserted as such (test_*_quirk): SimPO of an empty response is NaN in TRL and
Liger (0/0 in their length average), finite in alignops; Liger's KTO uses a negative KL estimate as
it is (TRL and alignops clamp it at 0) and has no desirable/undesirable weights; the SimPO defaults
(TRL's CPOConfig and Liger's module add the NLL term, cpo_alpha = 1; alignops's simpo_loss is the
paper's SimPO, cpo_alpha = 0).

Tolerance everywhere: rtol 1e-5 with atol 1e-5 x max(1, |want|) (the rule of tests/test_preference.py),
for fp32 against float64 and for fp32 against a peer's fp32.
"""

import inspect
import math
import types
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import alignops as ao
from tests import preference_oracle as ref
from tests.conftest import device_backend_pairs, require_framework

PAIRS = [("cpu", "torch")] + device_backend_pairs()
PAIR_IDS = [f"{d}-{b}" for d, b in PAIRS]
IGNORE = -100


def close(got, want, name, rtol=1e-5):
    got, want = torch.as_tensor(got).detach().double().cpu(), torch.as_tensor(want).detach().double().cpu()
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def sums_and_lengths(b, gen, dtype=torch.float32, max_len=30):
    """Summed log-probs of b responses and their lengths (>= 1); S ~ -U(0.2, 3) per token."""
    lengths = torch.randint(1, max_len, (b,), generator=gen)
    s = -(torch.rand(b, generator=gen, dtype=torch.float64) * 2.8 + 0.2) * lengths
    return s.to(dtype), lengths


# --------------------------------------------------------------------------------------------
# from sequence log-probs: oracles and closed forms


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 6), beta=st.floats(0.05, 5.0),
       gamma=st.floats(0.0, 3.0), eps=st.sampled_from([0.0, 0.1, 0.5]), alpha=st.sampled_from([0.0, 1.0, 0.3]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_simpo_matches_oracle(seed, b, beta, gamma, eps, alpha, dtype):
    gen = torch.Generator().manual_seed(seed)
    sw, lw = sums_and_lengths(b, gen, dtype)
    sl, ll = sums_and_lengths(b, gen, dtype)
    x, y = sw.clone().requires_grad_(True), sl.clone().requires_grad_(True)
    out = ao.simpo_loss(x, y, lw, ll, beta, gamma, eps, cpo_alpha=alpha)
    out.loss.backward()
    x64, y64 = sw.double().requires_grad_(True), sl.double().requires_grad_(True)
    want, want_losses = ref.simpo_loss(x64, y64, lw, ll, beta, gamma, eps, alpha)
    want.backward()
    close(out.loss, want, "loss")
    close(out.losses, want_losses, "losses")
    close(x.grad, x64.grad, "d/dS_w")
    close(y.grad, y64.grad, "d/dS_l")
    close(out.chosen_rewards, beta * sw.double() / lw, "chosen rewards = beta * mean log-prob")
    close(out.metrics["nll_loss"], -sw.double().sum() / lw.sum(), "nll_loss")
    assert out.loss.dtype == dtype and all(v.dtype == torch.float32 and not v.requires_grad
                                           for v in out.metrics.values())


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 6), beta=st.floats(0.01, 2.0),
       eps=st.sampled_from([0.0, 0.2]), alpha=st.sampled_from([0.0, 1.0, 2.5]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_cpo_matches_oracle(seed, b, beta, eps, alpha, dtype):
    gen = torch.Generator().manual_seed(seed)
    sw, lw = sums_and_lengths(b, gen, dtype)
    sl, _ = sums_and_lengths(b, gen, dtype)
    x, y = sw.clone().requires_grad_(True), sl.clone().requires_grad_(True)
    out = ao.cpo_loss(x, y, beta, eps, cpo_alpha=alpha, chosen_lengths=lw)
    out.loss.backward()
    x64, y64 = sw.double().requires_grad_(True), sl.double().requires_grad_(True)
    want, want_losses = ref.cpo_loss(x64, y64, lw, beta, eps, alpha)
    want.backward()
    close(out.loss, want, "loss")
    close(out.losses, want_losses, "losses")
    close(x.grad, x64.grad, "d/dS_w")
    close(y.grad, y64.grad, "d/dS_l")
    close(out.chosen_rewards, beta * sw.double(), "chosen rewards = beta * S")


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 8), beta=st.floats(0.01, 2.0),
       mode=st.sampled_from(["float", "tensor", "pair", "apo"]), kl=st.floats(-1.0, 3.0),
       weights=st.sampled_from([(1.0, 1.0), (1.33, 0.5), (0.0, 2.0)]), reference_free=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_kto_matches_oracle(seed, b, beta, mode, kl, weights, reference_free, dtype):
    gen = torch.Generator().manual_seed(seed)
    s, _ = sums_and_lengths(b, gen, dtype)
    s_ref = None if reference_free else (s.double() + torch.randn(b, generator=gen, dtype=torch.float64) * 3).to(dtype)
    desirable = torch.rand(b, generator=gen) > 0.4
    kw = dict(desirable_weight=weights[0], undesirable_weight=weights[1])
    if mode == "float":
        kw["kl"], z0 = kl, max(kl, 0.0)
    elif mode == "tensor":
        kw["kl"], z0 = torch.tensor(kl, dtype=dtype), max(kl, 0.0)
    elif mode == "pair":
        pkl = -torch.rand(5, generator=gen, dtype=torch.float64) * 20
        rkl = pkl - kl + torch.randn(5, generator=gen, dtype=torch.float64) * 0.1
        kw["policy_kl_logps"], kw["ref_kl_logps"] = pkl.to(dtype), rkl.to(dtype)
        z0 = ref.kto_reference_point(pkl, rkl)
    else:
        kw["loss_type"], z0 = "apo_zero_unpaired", 0.0
    x = s.clone().requires_grad_(True)
    out = ao.kto_loss(x, s_ref, desirable, beta, **kw)
    out.loss.backward()
    x64 = s.double().requires_grad_(True)
    want_losses = ref.kto_losses(x64, s_ref, desirable, beta, z0, *weights,
                                 loss_type="kto" if mode != "apo" else "apo_zero_unpaired")
    want_losses.mean().backward()
    close(out.losses, want_losses, "losses")
    close(out.loss, want_losses.mean(), "loss")
    close(x.grad, x64.grad, "d/dS")
    close(out.metrics["kl"], z0, "kl")
    rewards = beta * (s.double() - (0.0 if s_ref is None else s_ref.double()))
    if desirable.any():
        close(out.metrics["rewards/chosen"], rewards[desirable].mean(), "rewards/chosen")
        close(out.metrics["logps/chosen"], s.double()[desirable].mean(), "logps/chosen")
    if (~desirable).any():
        close(out.metrics["rewards/rejected"], rewards[~desirable].mean(), "rewards/rejected")
    assert all(torch.isfinite(v) and not v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("beta", [0.1, 2.5])
def test_simpo_equal_chosen_and_rejected(beta, gamma):
    """Equal mean log-probs: x = -gamma, the pair loss is softplus(gamma) (log 2 at gamma = 0) and
    dL/dS_w = -beta sigmoid(gamma) / (B L_w); the rejected side gets the opposite per-token weight."""
    lw, ll = torch.tensor([4, 10]), torch.tensor([2, 5])
    sw = torch.tensor([-8.0, -20.0], requires_grad=True)
    sl = (sw.detach() / lw * ll).requires_grad_(True)       # same means
    out = ao.simpo_loss(sw, sl, lw, ll, beta, gamma)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log1p(math.exp(gamma))))
    out.loss.backward()
    sig = 1 / (1 + math.exp(-gamma))
    torch.testing.assert_close(sw.grad, -beta * sig / (2 * lw.float()))
    torch.testing.assert_close(sl.grad, beta * sig / (2 * ll.float()))
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_cpo_equal_chosen_and_rejected(eps):
    """S_w = S_l: the pair loss is log 2 for any beta and smoothing; with the NLL term the loss adds
    cpo_alpha * (-sum S_w / sum L_w) and dL/dS_w = -beta/2 (1 - 2 eps) / B - cpo_alpha / sum L_w."""
    s = torch.tensor([-6.0, -9.0, -1.0], requires_grad=True)
    lw = torch.tensor([3, 3, 2])
    beta, alpha = 0.3, 0.7
    out = ao.cpo_loss(s, s.detach().clone(), beta, eps, cpo_alpha=alpha, chosen_lengths=lw)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2.0)))
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2.0) + alpha * 16.0 / 8))
    out.loss.backward()
    torch.testing.assert_close(s.grad, torch.full((3,), -beta / 2 * (1 - 2 * eps) / 3 - alpha / 8))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_at_the_reference_point(loss_type):
    """r = z0 (kto) or r = 0 (apo): every example's loss is lambda / 2 and dL/dS = -/+ beta lambda / (4 B)."""
    beta, wd, wu = 0.4, 1.5, 0.5
    ref_s = torch.tensor([-5.0, -7.0, -2.0, -9.0])
    z0 = 0.3 if loss_type == "kto" else 0.0
    s = (ref_s + z0).requires_grad_(True)
    desirable = torch.tensor([True, False, True, False])
    kw = dict(kl=z0) if loss_type == "kto" else {}
    out = ao.kto_loss(s, ref_s, desirable, beta, desirable_weight=wd, undesirable_weight=wu, loss_type=loss_type, **kw)
    torch.testing.assert_close(out.losses, torch.tensor([wd, wu, wd, wu]) / 2)
    out.loss.backward()
    torch.testing.assert_close(s.grad, beta / 16 * torch.tensor([-wd, wu, -wd, wu]))


def test_kto_reference_point_is_detached_and_clamped():
    s = torch.tensor([-3.0, -4.0], requires_grad=True)
    ref_s = torch.tensor([-3.5, -3.0])
    d = torch.tensor([True, False])
    pkl = torch.tensor([-10.0, -12.0], requires_grad=True)
    rkl = torch.tensor([-11.0, -12.0])                      # mean difference 0.5
    out = ao.kto_loss(s, ref_s, d, kl=None, policy_kl_logps=pkl, ref_kl_logps=rkl)
    out.loss.backward()
    assert pkl.grad is None and out.metrics["kl"].item() == pytest.approx(0.5)
    torch.testing.assert_close(out.loss, ao.kto_loss(s, ref_s, d, kl=0.5).loss)
    negative = ao.kto_loss(s, ref_s, d, policy_kl_logps=pkl, ref_kl_logps=rkl + 3.0)   # mean -2.5
    assert negative.metrics["kl"].item() == 0.0
    torch.testing.assert_close(negative.loss, ao.kto_loss(s, ref_s, d, kl=0.0).loss)
    torch.testing.assert_close(ao.kto_loss(s, ref_s, d, kl=-4.0).loss, ao.kto_loss(s, ref_s, d, kl=0.0).loss)


def test_kto_one_label_batches_and_empty_batch():
    s, ref_s = torch.tensor([-3.0, -4.0, -1.0]), torch.tensor([-3.5, -3.0, -1.0])
    for label in (True, False):
        d = torch.full((3,), label)
        out = ao.kto_loss(s, ref_s, d, kl=0.1)
        want = ref.kto_losses(s, ref_s, d, 0.1, 0.1).mean()
        close(out.loss, want, f"all {label}")
        assert out.metrics["rewards/margins"].item() == 0.0
        assert all(torch.isfinite(v) for v in out.metrics.values())
    empty = ao.kto_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), kl=0.0)
    assert empty.loss.item() == 0 and all(torch.isfinite(v) for v in empty.metrics.values())


def test_empty_responses_and_empty_batches():
    """A response with L = 0 (all tokens masked) has mean 0 in SimPO (never 0/0); an empty batch is
    loss 0 with finite metrics; the NLL of no chosen token is 0, not 0/0."""
    sw, sl = torch.tensor([0.0, -6.0]), torch.tensor([-4.0, 0.0])
    lw, ll = torch.tensor([0, 3]), torch.tensor([2, 0])
    out = ao.simpo_loss(sw, sl, lw, ll, 2.0, 0.5, cpo_alpha=1.0)
    want, _ = ref.simpo_loss(sw, sl, lw, ll, 2.0, 0.5, 0.0, 1.0)
    close(out.loss, want, "simpo with empty responses")
    for fn in (lambda e: ao.simpo_loss(e, e, e.long(), e.long(), cpo_alpha=1.0),
               lambda e: ao.cpo_loss(e, e, chosen_lengths=e.long())):
        o = fn(torch.zeros(0))
        assert o.loss.item() == 0 and all(torch.isfinite(v) for v in o.metrics.values())
    z = ao.cpo_loss(torch.zeros(2), torch.zeros(2), chosen_lengths=torch.zeros(2, dtype=torch.long))
    assert z.metrics["nll_loss"].item() == 0 and z.loss.item() == pytest.approx(math.log(2.0))


def test_normalizers_make_micro_batches_add_up():
    gen = torch.Generator().manual_seed(5)
    sw, lw = sums_and_lengths(4, gen)
    sl, ll = sums_and_lengths(4, gen)
    d = torch.tensor([True, False, False, True])
    tokens = int(lw.sum())
    full = ao.simpo_loss(sw, sl, lw, ll, 2.0, 1.0, cpo_alpha=0.5).loss
    parts = sum(ao.simpo_loss(sw[i:i + 2], sl[i:i + 2], lw[i:i + 2], ll[i:i + 2], 2.0, 1.0, cpo_alpha=0.5,
                              normalizer=4, nll_normalizer=tokens).loss for i in (0, 2))
    torch.testing.assert_close(parts, full)
    full = ao.cpo_loss(sw, sl, chosen_lengths=lw).loss
    parts = sum(ao.cpo_loss(sw[i:i + 2], sl[i:i + 2], normalizer=4, nll_normalizer=tokens).loss for i in (0, 2))
    torch.testing.assert_close(parts, full)
    full = ao.kto_loss(sw, sl, d, kl=0.2).loss
    parts = sum(ao.kto_loss(sw[i:i + 2], sl[i:i + 2], d[i:i + 2], kl=0.2, normalizer=4).loss for i in (0, 2))
    torch.testing.assert_close(parts, full)


def test_bf16_inputs_compute_in_fp32():
    gen = torch.Generator().manual_seed(6)
    sw, lw = sums_and_lengths(3, gen)
    sl, ll = sums_and_lengths(3, gen)
    for got, want in (
            (ao.simpo_loss(sw.bfloat16(), sl.bfloat16(), lw, ll), ao.simpo_loss(sw.bfloat16().float(),
                                                                               sl.bfloat16().float(), lw, ll)),
            (ao.cpo_loss(sw.bfloat16(), sl.bfloat16(), chosen_lengths=lw),
             ao.cpo_loss(sw.bfloat16().float(), sl.bfloat16().float(), chosen_lengths=lw)),
            (ao.kto_loss(sw.bfloat16(), sl.bfloat16(), lw > 10, kl=0.1),
             ao.kto_loss(sw.bfloat16().float(), sl.bfloat16().float(), lw > 10, kl=0.1))):
        assert got.loss.dtype == torch.float32
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)


def test_bad_input():
    a = torch.zeros(3)
    n = torch.full((3,), 2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        ao.simpo_loss(a, a, None, n)
    with pytest.raises(ValueError, match="simpo_gamma"):
        ao.simpo_loss(a, a, n, n, simpo_gamma=-0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        ao.cpo_loss(a, a, label_smoothing=0.6, chosen_lengths=n)
    with pytest.raises(ValueError, match="chosen_lengths"):
        ao.cpo_loss(a, a)                       # cpo_alpha = 1 needs the chosen token count
    ao.cpo_loss(a, a, cpo_alpha=0.0)            # no NLL term: no lengths needed
    with pytest.raises(ValueError, match="kl"):
        ao.kto_loss(a, a, a > 0)                # KTO needs its reference point
    with pytest.raises(ValueError, match="kl"):
        ao.kto_loss(a, a, a > 0, kl=0.1, loss_type="apo_zero_unpaired")
    with pytest.raises(ValueError, match="ref_kl_logps"):
        ao.kto_loss(a, a, a > 0, policy_kl_logps=a)
    with pytest.raises(ValueError, match="desirable"):
        ao.kto_loss(a, a, torch.tensor([0, 1, 2]), kl=0.0)
    with pytest.raises(ValueError, match="hidden"):
        ao.fused_linear_simpo_loss(torch.zeros(3, 2, 4), torch.zeros(5, 4), torch.zeros(3, 2, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# the fused lm_head versions


def seq_logps64(hidden, weight, labels, mask=None):
    """Float64 summed log-probs and lengths of the rows of hidden @ weight.T (logits materialised)."""
    logits = hidden.double() @ weight.double().T
    valid = labels != IGNORE if mask is None else mask & (labels != IGNORE)
    logp = torch.log_softmax(logits, -1).gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp)).sum(-1), valid.sum(-1)


def head_batch(seed, rows, t=6, h=16, v=40, empty_row=None):
    """hidden [rows, t, h], weight [v, h], labels with a prompt (ignore_index) and right padding."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / 2
    labels = torch.randint(0, v, (rows, t), generator=gen)
    for i in range(rows):
        start = int(torch.randint(0, 2, (1,), generator=gen))          # prompt positions
        end = t - int(torch.randint(0, 2, (1,), generator=gen))        # right padding
        labels[i, :start] = IGNORE
        labels[i, end:] = IGNORE
    if empty_row is not None:
        labels[empty_row] = IGNORE
    return hidden, weight, labels


def leaves(*ts, dtype=None, device="cpu"):
    return [t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_(True) for t in ts]


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("method", ["simpo", "cpo", "kto"])
def test_fused_matches_float64_oracle(device, backend, method):
    """fused_linear_* (fp32) == the float64 oracle on materialised logits, in value, d hidden and
    d weight; with ignore_index labels inside rows and an all-masked row (row 1)."""
    b = 3
    rows = b if method == "kto" else 2 * b
    hidden, weight, labels = head_batch(11, rows, empty_row=1)
    d = torch.tensor([True, False, False])
    gen = torch.Generator().manual_seed(12)
    ref_s = -torch.rand(rows, generator=gen, dtype=torch.float64) * 10
    beta = 0.7

    def loss64(h, w):
        s, n = seq_logps64(h, w, labels)
        if method == "simpo":
            return ref.simpo_loss(s[:b], s[b:], n[:b], n[b:], beta, 0.4, 0.1, 0.5)[0]
        if method == "cpo":
            return ref.cpo_loss(s[:b], s[b:], n[:b], beta, 0.1, 0.5)[0]
        return ref.kto_losses(s, ref_s, d, beta, 0.25, 1.2, 0.8).mean()

    h, w = leaves(hidden, weight, device=device)
    lab = labels.to(device)
    kw = dict(backend=backend, chunk_size=5)                    # tiles that split rows
    if method == "simpo":
        out = ao.fused_linear_simpo_loss(h, w, lab, None, beta, 0.4, 0.1, cpo_alpha=0.5, **kw)
    elif method == "cpo":
        out = ao.fused_linear_cpo_loss(h, w, lab, None, beta, 0.1, cpo_alpha=0.5, **kw)
    else:
        out = ao.fused_linear_kto_loss(h, w, lab, d.to(device), ref_s.float().to(device), beta=beta, kl=0.25,
                                       desirable_weight=1.2, undesirable_weight=0.8, **kw)
    out.loss.backward()
    h64, w64 = leaves(hidden, weight, dtype=torch.float64)
    want = loss64(h64, w64)
    want.backward()
    assert torch.isfinite(out.loss)
    close(out.loss, want, "loss")
    close(h.grad, h64.grad, "d hidden")
    close(w.grad, w64.grad, "d weight")
    assert h.grad[1].abs().max().item() == 0.0, "the all-masked row gets no gradient"


def test_fused_equals_logits_path():
    """fused_linear_simpo_loss == simpo_loss(sequence_logprobs(hidden @ W.T + b)) with a bias and a
    temperature, value and the three gradients; mask= restricts the response like ignore_index."""
    hidden, weight, labels = head_batch(13, 4)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(14))
    mask = labels != IGNORE
    mask[0, -2:] = False
    h, w, bb = leaves(hidden, weight, bias)
    out = ao.fused_linear_simpo_loss(h, w, labels, mask, 1.5, 0.3, bias=bb, temperature=0.8, cpo_alpha=0.2)
    out.loss.backward()
    h2, w2, b2 = leaves(hidden, weight, bias)
    s, n = ao.sequence_logprobs(h2 @ w2.T + b2, labels, mask, temperature=0.8, return_lengths=True)
    want = ao.simpo_loss(s[:2], s[2:], n[:2], n[2:], 1.5, 0.3, cpo_alpha=0.2)
    want.loss.backward()
    close(out.loss, want.loss, "loss")
    for got, exp, name in ((h.grad, h2.grad, "hidden"), (w.grad, w2.grad, "weight"), (bb.grad, b2.grad, "bias")):
        close(got, exp, f"d {name}")


# --------------------------------------------------------------------------------------------
# TRL: its own loss code on a stand-in trainer


class StandIn:
    """A `self` for a TRL trainer's methods: the config fields as attributes; any other attribute is
    the trainer class's own (functions bound to this object, static methods as they are)."""

    def __init__(self, cls, **fields):
        self._cls = cls
        self.__dict__.update(fields)

    def __getattr__(self, name):
        attr = inspect.getattr_static(self._cls, name)
        if isinstance(attr, staticmethod):
            return attr.__func__
        return types.MethodType(attr, self)


def _accelerator():
    return types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)


def trl_cpo_loss(hidden, weight, labels, **config):
    """TRL's CPOTrainer.get_batch_loss_metrics on hidden [2B, T, H]: the model's logits at position t
    are hidden[:, t] @ weight.T and predict labels[:, t] (TRL shifts by one: its labels carry a
    leading ignored column, its logits a trailing unused one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: PLC0415
    b = hidden.shape[0] // 2
    pad = torch.full((2 * b, 1), IGNORE)
    trl_labels = torch.cat([pad, labels], 1)
    ids = torch.zeros_like(trl_labels)
    batch = {"chosen_input_ids": ids[:b], "chosen_attention_mask": torch.ones_like(ids[:b]),
             "chosen_labels": trl_labels[:b], "rejected_input_ids": ids[b:],
             "rejected_attention_mask": torch.ones_like(ids[b:]), "rejected_labels": trl_labels[b:]}

    def model(input_ids, **_):
        logits = hidden @ weight.T
        return types.SimpleNamespace(logits=torch.cat([logits, torch.zeros_like(logits[:, :1])], 1))

    self = StandIn(CPOTrainer, is_encoder_decoder=False, pad_token_id=0, accelerator=_accelerator(),
                   aux_loss_enabled=False, alpha=0.0, **config)
    loss, metrics = CPOTrainer.get_batch_loss_metrics(self, model, batch)
    return loss, metrics


def trl_kto_loss(hidden, weight, labels, desirable, ref_logps, kl_hidden, kl_labels, ref_kl_logps, **config):
    """TRL's KTOTrainer._compute_loss (precomputed reference log-probs): the stand-in model returns the
    fused head's token log-probs of hidden @ weight.T for the main rows and of kl_hidden for the KL
    rows (told apart by their first input id, a prompt position)."""
    from trl.trainer.kto_trainer import KTOTrainer  # noqa: PLC0415

    def trl_inputs(lab, first):
        ids = torch.cat([torch.full((lab.shape[0], 1), first), torch.where(lab == IGNORE, 0, lab)], 1)
        completion = torch.cat([torch.zeros(lab.shape[0], 1, dtype=torch.long), (lab != IGNORE).long()], 1)
        return ids, torch.ones_like(ids), completion

    ids, att, comp = trl_inputs(labels, 1)
    kl_ids, kl_att, kl_comp = trl_inputs(kl_labels, 2)
    batch = {"input_ids": ids, "attention_mask": att, "completion_mask": comp, "label": desirable,
             "KL_input_ids": kl_ids, "KL_attention_mask": kl_att, "KL_completion_mask": kl_comp,
             "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}

    def model(input_ids, labels, **_):
        h = hidden if int(input_ids[0, 0]) == 1 else kl_hidden
        target = labels[:, 1:]
        logp = torch.log_softmax(h @ weight.T, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        logp = torch.where(target == IGNORE, torch.zeros_like(logp), logp)
        return types.SimpleNamespace(log_probs=logp, entropy=torch.zeros_like(logp),
                                     mean_logits=torch.zeros_like(logp))

    # TRL's __init__: calculate_KL = loss_type not in ["apo_zero_unpaired"]
    self = StandIn(KTOTrainer, accelerator=_accelerator(), calculate_KL=config["loss_type"] == "kto",
                   aux_loss_enabled=False,
                   precompute_ref_logps=True, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                   model=types.SimpleNamespace(training=True), _total_train_tokens=0, _tp_size=1,
                   router_aux_loss_coef=0.0, **config)
    loss = KTOTrainer._compute_loss(self, model, batch, return_outputs=False)
    return loss, self._metrics["train"]


@pytest.mark.parametrize("loss_type,eps,alpha", [("simpo", 0.0, 0.0), ("simpo", 0.2, 1.0),
                                                 ("sigmoid", 0.0, 1.0), ("sigmoid", 0.3, 0.0)])
def test_trl_cpo_trainer_parity(loss_type, eps, alpha):
    require_framework("trl", "trl")
    hidden, weight, labels = head_batch(21, 6)
    beta, gamma = (2.0, 1.2) if loss_type == "simpo" else (0.2, None)
    h, w = leaves(hidden, weight)
    config = dict(loss_type=loss_type, beta=beta, label_smoothing=eps, cpo_alpha=alpha)
    if gamma is not None:
        config["simpo_gamma"] = gamma
    want, metrics = trl_cpo_loss(h, w, labels, **config)
    want.backward()
    h2, w2 = leaves(hidden, weight)
    if loss_type == "simpo":
        out = ao.fused_linear_simpo_loss(h2, w2, labels, None, beta, gamma, eps, cpo_alpha=alpha)
    else:
        out = ao.fused_linear_cpo_loss(h2, w2, labels, None, beta, eps, cpo_alpha=alpha)
    out.loss.backward()
    close(out.loss, want, "loss")
    close(h2.grad, h.grad, "d hidden")
    close(w2.grad, w.grad, "d weight")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        close(out.metrics[name], metrics[name], name)
    if alpha:
        close(out.metrics["nll_loss"], metrics["nll_loss"], "nll_loss")


# kl_shift: TRL's KL estimate positive, or negative (clamped to 0); apo_zero_unpaired has no KL term
@pytest.mark.parametrize("loss_type,kl_shift", [("kto", 0.7), ("kto", -0.7), ("apo_zero_unpaired", 0.7)])
def test_trl_kto_trainer_parity(loss_type, kl_shift):
    require_framework("trl", "trl")
    hidden, weight, labels = head_batch(31, 4)
    kl_hidden, _, _ = head_batch(32, 4)
    kl_labels = labels.roll(1, 0)        # TRL's mismatched pairs: the completions cycled by one
    desirable = torch.tensor([True, False, True, True])
    gen = torch.Generator().manual_seed(33)
    ref_logps = (seq_logps64(hidden, weight, labels)[0] + torch.randn(4, generator=gen, dtype=torch.float64)).float()
    with torch.no_grad():
        policy_kl = ao.fused_linear_sequence_logprobs(kl_hidden, weight, kl_labels)
    ref_kl = policy_kl - kl_shift + torch.randn(4, generator=gen) * 0.1
    config = dict(loss_type=loss_type, beta=0.5, desirable_weight=1.33, undesirable_weight=0.75)
    h, w = leaves(hidden, weight)
    want, metrics = trl_kto_loss(h, w, labels, desirable, ref_logps, kl_hidden, kl_labels,
                                 ref_kl if loss_type == "kto" else None, **config)
    want.backward()
    h2, w2 = leaves(hidden, weight)
    kw = dict(policy_kl_logps=policy_kl, ref_kl_logps=ref_kl) if loss_type == "kto" else {}
    out = ao.fused_linear_kto_loss(h2, w2, labels, desirable, ref_logps, **config, **kw)
    out.loss.backward()
    close(out.loss, want, "loss")
    close(h2.grad, h.grad, "d hidden")
    close(w2.grad, w.grad, "d weight")
    if loss_type == "kto":
        close(out.metrics["kl"], metrics["kl"][-1], "kl")
        assert (out.metrics["kl"].item() == 0.0) == (kl_shift < 0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        close(out.metrics[name], metrics[name][-1], name)


def test_trl_defaults_and_where_alignops_departs():
    """alignops's defaults are TRL's (CPOConfig, KTOConfig), except simpo_loss's cpo_alpha: TRL's
    CPOConfig has cpo_alpha = 1.0 for every loss_type, so its loss_type='simpo' is CPO-SimPO unless
    cpo_alpha=0 is set (TRL's docs: pure SimPO is cpo_alpha=0); alignops's simpo_loss is SimPO."""
    require_framework("trl", "trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_config import CPOConfig  # noqa: PLC0415
    from trl.trainer.kto_config import KTOConfig  # noqa: PLC0415

    def trl_default(cfg, name):
        return cfg.__dataclass_fields__[name].default

    def ours(fn, name):
        return inspect.signature(fn).parameters[name].default

    for fn in (ao.cpo_loss, ao.fused_linear_cpo_loss):
        for name in ("beta", "label_smoothing", "cpo_alpha"):
            assert ours(fn, name) == trl_default(CPOConfig, name), (fn.__name__, name)
    for fn in (ao.simpo_loss, ao.fused_linear_simpo_loss):
        for name in ("beta", "label_smoothing", "simpo_gamma"):
            assert ours(fn, name) == trl_default(CPOConfig, name), (fn.__name__, name)
        assert ours(fn, "cpo_alpha") == 0.0 and trl_default(CPOConfig, "cpo_alpha") == 1.0
    for fn in (ao.kto_loss, ao.fused_linear_kto_loss):
        for name in ("beta", "desirable_weight", "undesirable_weight", "loss_type"):
            assert ours(fn, name) == trl_default(KTOConfig, name), (fn.__name__, name)


def test_trl_simpo_empty_response_quirk():
    """A pair whose rejected response is all prompt/padding: TRL's length average is 0/0, so its
    SimPO loss is NaN; alignops gives that response mean 0 and a finite loss equal to the oracle's."""
    require_framework("trl", "trl")
    hidden, weight, labels = head_batch(41, 4, empty_row=3)
    with torch.no_grad():
        trl, _ = trl_cpo_loss(hidden, weight, labels, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                              label_smoothing=0.0, cpo_alpha=0.0)
        ours = ao.fused_linear_simpo_loss(hidden, weight, labels, beta=2.0)
    assert math.isnan(trl.item())
    s, n = seq_logps64(hidden, weight, labels)
    close(ours.loss, ref.simpo_loss(s[:2], s[2:], n[:2], n[2:], 2.0, 0.5)[0], "alignops")


# --------------------------------------------------------------------------------------------
# Liger's chunked losses


def liger():
    require_framework("liger-kernel", "liger_kernel")
    import liger_kernel.chunked_loss  # noqa: PLC0415
    return liger_kernel.chunked_loss


@pytest.mark.parametrize("eps,alpha", [(0.0, 0.0), (0.1, 1.0)])
def test_liger_simpo_parity(eps, alpha):
    lk = liger()
    hidden, weight, labels = head_batch(51, 6)
    h, w = leaves(hidden, weight)
    loss_fn = lk.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.8, label_smoothing=eps, alpha=alpha,
                                           compute_nll_loss=alpha != 0, compiled=False)
    want, aux = loss_fn(w, h, labels)
    want.backward()
    h2, w2 = leaves(hidden, weight)
    out = ao.fused_linear_simpo_loss(h2, w2, labels, None, 2.0, 0.8, eps, cpo_alpha=alpha)
    out.loss.backward()
    close(out.loss, want, "loss")
    close(h2.grad, h.grad, "d hidden")
    close(w2.grad, w.grad, "d weight")
    close(out.chosen_rewards / 2.0, aux[0], "chosen mean log-probs")
    close(out.rejected_rewards / 2.0, aux[1], "rejected mean log-probs")


@pytest.mark.parametrize("eps,alpha", [(0.0, 1.0), (0.2, 0.5), (0.0, 0.0)])
def test_liger_cpo_parity(eps, alpha):
    lk = liger()
    hidden, weight, labels = head_batch(52, 6)
    h, w = leaves(hidden, weight)
    loss_fn = lk.LigerFusedLinearCPOLoss(beta=0.3, label_smoothing=eps, alpha=alpha, compute_nll_loss=alpha != 0,
                                         compiled=False)
    want, aux = loss_fn(w, h, labels)
    want.backward()
    h2, w2 = leaves(hidden, weight)
    out = ao.fused_linear_cpo_loss(h2, w2, labels, None, 0.3, eps, cpo_alpha=alpha)
    out.loss.backward()
    close(out.loss, want, "loss")
    close(h2.grad, h.grad, "d hidden")
    close(w2.grad, w.grad, "d weight")
    close(out.chosen_rewards / 0.3, aux[0], "chosen summed log-probs")
    if alpha:
        close(out.metrics["nll_loss"], aux[4], "nll_loss")


@pytest.mark.parametrize("use_ref", [True, False])
def test_liger_kto_parity(use_ref):
    lk = liger()
    hidden, weight, labels = head_batch(53, 5)
    ref_hidden, ref_weight, _ = head_batch(54, 5)
    desirable = torch.tensor([True, False, False, True, False])
    with torch.no_grad():
        ref_logps = ao.fused_linear_sequence_logprobs(ref_hidden, ref_weight, labels) if use_ref else None
    h, w = leaves(hidden, weight)
    loss_fn = lk.LigerFusedLinearKTOLoss(beta=0.6, use_ref_model=use_ref, compiled=False)
    want, _ = loss_fn(h, w, labels, None, desirable, ref_hidden if use_ref else None,
                      ref_weight if use_ref else None, None, torch.tensor(0.35))
    want.backward()
    h2, w2 = leaves(hidden, weight)
    out = ao.fused_linear_kto_loss(h2, w2, labels, desirable, ref_logps, beta=0.6, kl=0.35)
    out.loss.backward()
    close(out.loss, want, "loss")
    close(h2.grad, h.grad, "d hidden")
    close(w2.grad, w.grad, "d weight")


def test_liger_quirks():
    """(1) Liger's SimPO of an empty response is NaN (0/0 length average); alignops is finite.
    (2) Liger's KTO takes the KL estimate as given: a negative one moves the reference point below 0,
    where TRL and alignops clamp it to 0, so alignops(kl=-0.5) == Liger(kl=0) != Liger(kl=-0.5).
    (3) Liger's KTO has no desirable/undesirable weights: it equals alignops with both weights 1.
    (4) LigerFusedLinearSimPOLoss() adds the chosen NLL by default (alpha=1, compute_nll_loss=True),
    as TRL's CPOConfig does: that is alignops's cpo_alpha=1.0, not simpo_loss's default 0."""
    lk = liger()
    hidden, weight, labels = head_batch(61, 4, empty_row=2)
    with torch.no_grad():
        quirk = lk.LigerFusedLinearSimPOLoss(compute_nll_loss=False, compiled=False)(weight, hidden, labels)[0]
        ours = ao.fused_linear_simpo_loss(hidden, weight, labels).loss
    assert math.isnan(quirk.item()) and torch.isfinite(ours)

    hidden, weight, labels = head_batch(62, 4)
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(64))
    d = torch.tensor([True, False, True, True])      # unbalanced: the z0 shifts of the two labels do not cancel
    kto = lk.LigerFusedLinearKTOLoss(beta=0.5, use_ref_model=True, compiled=False)
    with torch.no_grad():
        ref_logps = ao.fused_linear_sequence_logprobs(ref_hidden, weight, labels)
        at = {k: kto(hidden, weight, labels, None, d, ref_hidden, weight, None, torch.tensor(k))[0]
              for k in (0.0, -0.5)}
        ours = ao.fused_linear_kto_loss(hidden, weight, labels, d, ref_logps, beta=0.5, kl=-0.5).loss
        weighted = ao.fused_linear_kto_loss(hidden, weight, labels, d, ref_logps, beta=0.5, kl=0.0,
                                            desirable_weight=2.0).loss
    close(ours, at[0.0], "clamped reference point")
    assert abs(at[-0.5].item() - at[0.0].item()) > 1e-3
    assert abs(weighted.item() - at[0.0].item()) > 1e-3

    hidden, weight, labels = head_batch(63, 4)
    with torch.no_grad():
        default = lk.LigerFusedLinearSimPOLoss(compiled=False)(weight, hidden, labels)[0]
        close(ao.fused_linear_simpo_loss(hidden, weight, labels, cpo_alpha=1.0).loss, default, "CPO-SimPO")
        assert abs(ao.fused_linear_simpo_loss(hidden, weight, labels).loss.item() - default.item()) > 1e-2
