"""dpo_loss (sigmoid / cDPO / robust / IPO / hinge), orpo_loss, gvpo_loss and rahf_loss against
float64 eager math (tests/preference_oracle.py), docs/methods.md's oracles and 3.3's edge cases;
the fused path (sequence_logprobs -> pairwise loss) on every backend that runs here."""

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import alignops as ao
from tests import preference_oracle as ref
from tests import sft_oracle as ref_sft
from tests.conftest import device_backend_pairs

PAIRS = [("cpu", "torch")] + device_backend_pairs()
PAIR_IDS = [f"{d}-{b}" for d, b in PAIRS]
LN2 = math.log(2.0)


def close(got, want, name, rtol=1e-5):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def four_logps(b, gen, scale=20.0, dtype=torch.float32):
    """Summed sequence log-probs (negative) for policy/ref chosen/rejected."""
    return [(-torch.rand(b, generator=gen, dtype=torch.float64) * scale).to(dtype) for _ in range(4)]


# --------------------------------------------------------------------------------------------
# DPO family


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 6),
       loss_type=st.sampled_from(["sigmoid", "robust", "ipo", "hinge"]),
       beta=st.floats(0.01, 2.0), eps=st.sampled_from([0.0, 0.1, 0.3]),
       length_norm=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_dpo_matches_oracle(seed, b, loss_type, beta, eps, length_norm, dtype):
    gen = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = four_logps(b, gen, dtype=dtype)
    if loss_type in ("ipo", "hinge"):
        eps = 0.0
    lc = torch.randint(1, 30, (b,), generator=gen)
    lr = torch.randint(1, 30, (b,), generator=gen)
    norm = loss_type == "ipo" and length_norm
    pck, prk = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    out = ao.dpo_loss(pck, prk, rc, rr, beta, loss_type, eps, chosen_lengths=lc, rejected_lengths=lr,
                      ipo_length_norm=length_norm)
    out.loss.backward()
    pcr, prr = pc.double().requires_grad_(True), pr.double().requires_grad_(True)
    losses = ref.dpo_losses(pcr, prr, rc, rr, beta, loss_type, eps, lc if norm else None, lr if norm else None)
    losses.mean().backward()
    close(out.losses, losses, "losses")
    close(out.loss, losses.mean(), "loss")
    close(pck.grad, pcr.grad, "grad chosen")
    close(prk.grad, prr.grad, "grad rejected")
    assert out.loss.dtype == dtype


def test_dpo_metrics_follow_trl():
    pc = torch.tensor([-3.0, -5.0, -2.0])
    pr = torch.tensor([-4.0, -4.0, -7.0])  # third pair: rejected reward 0.5 > chosen 0.25
    rc = torch.tensor([-3.5, -5.0, -2.5])
    rr = torch.tensor([-4.0, -3.0, -8.0])
    out = ao.dpo_loss(pc, pr, rc, rr, beta=0.5)
    chosen = 0.5 * (pc - rc)
    rejected = 0.5 * (pr - rr)
    m = out.metrics
    torch.testing.assert_close(m["rewards/chosen"], chosen.mean())
    torch.testing.assert_close(m["rewards/rejected"], rejected.mean())
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor(2 / 3))
    torch.testing.assert_close(m["rewards/margins"], (chosen - rejected).mean())
    torch.testing.assert_close(m["logps/chosen"], pc.mean())
    torch.testing.assert_close(m["logps/rejected"], pr.mean())
    torch.testing.assert_close(out.chosen_rewards, chosen)
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in m.values())


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25, 0.4])
def test_dpo_at_h_zero(beta, eps):
    """docs/methods.md 2.22: policy = reference gives log 2 for sigmoid/cDPO/robust at any beta and
    smoothing. dL/dS_w is -beta/2 for plain DPO; with smoothing eps it is -beta/2 + eps*beta (cDPO)
    and -beta / (2 (1 - 2 eps)) (robust): the -beta/2 oracle holds for eps = 0 only."""
    s = torch.tensor([-7.0, -30.0])
    expected_grad = {"sigmoid": -beta / 2 + eps * beta, "robust": -beta / (2 * (1 - 2 * eps))}
    for loss_type in ("sigmoid", "robust"):
        pc = s.clone().requires_grad_(True)
        out = ao.dpo_loss(pc, s + 1, s, s + 1, beta, loss_type, eps)
        torch.testing.assert_close(out.losses, torch.full((2,), LN2))
        out.losses.sum().backward()
        torch.testing.assert_close(pc.grad, torch.full((2,), expected_grad[loss_type]))
        if eps == 0:
            torch.testing.assert_close(pc.grad, torch.full((2,), -beta / 2))


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("length_norm", [True, False])
def test_ipo_at_h_zero(tau, length_norm):
    s = torch.tensor([-7.0, -30.0, -1.0])
    lengths = torch.tensor([3, 10, 1])
    out = ao.dpo_loss(s, s - 2, s, s - 2, tau, "ipo", chosen_lengths=lengths, rejected_lengths=lengths,
                      ipo_length_norm=length_norm)
    torch.testing.assert_close(out.loss, torch.tensor(1 / (4 * tau**2)))
    assert ao.dpo_loss(s, s, s, s, 0.1, "ipo", ipo_length_norm=False).loss.item() == pytest.approx(25.0)


def test_ipo_length_norm_divides_each_log_ratio_by_its_length():
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-30.0]), torch.tensor([-12.0]), torch.tensor([-24.0])
    lc, lr = torch.tensor([4]), torch.tensor([6])
    h = (-10 + 12) / 4 - (-30 + 24) / 6
    out = ao.dpo_loss(pc, pr, rc, rr, 0.5, "ipo", chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(out.loss, torch.tensor((h - 1.0) ** 2))
    raw = ao.dpo_loss(pc, pr, rc, rr, 0.5, "ipo", ipo_length_norm=False)
    torch.testing.assert_close(raw.loss, torch.tensor((2 + 6 - 1.0) ** 2))


def test_dpo_uses_logsigmoid_for_extreme_margins():
    """beta*h = -2000: log(sigmoid) underflows to -inf in fp32; logsigmoid gives 2000."""
    pc = torch.tensor([-3000.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-1000.0]), torch.tensor([-1000.0]), torch.tensor([-3000.0])
    out = ao.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.0)
    torch.testing.assert_close(out.loss, torch.tensor(2000.0))
    out.loss.backward()
    torch.testing.assert_close(pc.grad, torch.tensor([-0.5]))
    assert not torch.isfinite(-torch.log(torch.sigmoid(torch.tensor(-2000.0))))
    # cDPO, robust and hinge at the same margin: value and gradient against the float64 formulas
    # (robust: 0.8 * 2000 / 0.6, hinge: 1 + 2000)
    for loss_type, eps in (("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0)):
        x = pc.detach().clone().requires_grad_()
        out = ao.dpo_loss(x, pr, rc, rr, 0.5, loss_type, eps)
        out.loss.backward()
        x64 = pc.detach().double().requires_grad_()
        want = ref.dpo_losses_wide(x64, pr, rc, rr, 0.5, loss_type, eps).mean()
        (want_grad,) = torch.autograd.grad(want, x64)
        close(out.loss, want, loss_type)
        close(x.grad, want_grad, f"{loss_type} d/dchosen")
    assert ref.dpo_losses_wide(pc, pr, rc, rr, 0.5, "robust", 0.2).item() == pytest.approx(0.8 * 2000 / 0.6)
    assert ref.dpo_losses_wide(pc, pr, rc, rr, 0.5, "hinge").item() == 2001.0


def test_dpo_reference_free_and_normalizer():
    gen = torch.Generator().manual_seed(1)
    pc, pr, _, _ = four_logps(4, gen)
    free = ao.dpo_loss(pc, pr, beta=0.2)
    zeros = torch.zeros(4)
    torch.testing.assert_close(free.loss, ao.dpo_loss(pc, pr, zeros, zeros, beta=0.2).loss)
    # Micro-batches with the global pair count add up to the full batch.
    full = ao.dpo_loss(pc, pr, beta=0.2).loss
    halves = sum(ao.dpo_loss(pc[i:i + 2], pr[i:i + 2], beta=0.2, normalizer=4).loss for i in (0, 2))
    torch.testing.assert_close(halves, full)
    empty = ao.dpo_loss(torch.zeros(0), torch.zeros(0))
    assert empty.loss.item() == 0 and all(torch.isfinite(v) for v in empty.metrics.values())


def test_dpo_bad_input():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        ao.dpo_loss(a, torch.zeros(4), a, a)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        ao.dpo_loss(a, a, a, torch.zeros(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        ao.dpo_loss(a, a, a, a, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        ao.dpo_loss(a, a, a, a, loss_type="robust", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="loss_type"):
        ao.dpo_loss(a, a, a, a, loss_type="kto")
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        ao.dpo_loss(a, a, a, None)
    with pytest.raises(ValueError, match="lengths"):
        ao.dpo_loss(a, a, a, a, loss_type="ipo")
    with pytest.raises(ValueError, match="beta"):
        ao.dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        ao.dpo_loss([0.0], a, a, a)
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        ao.dpo_loss(torch.zeros(3, dtype=torch.long), a, a, a)


@pytest.mark.parametrize("device,backend", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_fused_from_logits(device, backend, loss_type):
    """logits -> sequence_logprobs (fused) -> dpo_loss, value and logits gradient, vs float64."""
    if backend == "triton":
        importlib.import_module("alignops.kernels.token_stats")
    gen = torch.Generator().manual_seed(2)
    b, t, v = 2, 5, 263 if backend == "triton" else 1031
    dtype = torch.float64 if backend == "torch" else torch.float32
    logits = (torch.randn(2 * b, t, v, generator=gen, dtype=torch.float64) * 2)
    logits[0, 0, 7] += 50  # a peaked row
    logits = logits.to(dtype=dtype, device=device)
    labels = torch.randint(0, v, (2 * b, t), generator=gen).to(device)
    mask = (torch.rand(2 * b, t, generator=gen) > 0.3).to(device)
    mask[:, 0] = True
    ref_logps = -torch.rand(2 * b, generator=gen, dtype=torch.float64) * 30

    def run(x, seq_fn, lengths):
        s = seq_fn(x)
        return ao.dpo_loss(s[:b], s[b:], ref_logps[:b].to(s), ref_logps[b:].to(s), 0.3, loss_type,
                           chosen_lengths=lengths[:b], rejected_lengths=lengths[b:]).loss

    xk = logits.detach().requires_grad_(True)
    lengths = mask.sum(-1).cpu()
    got = run(xk, lambda x: ao.sequence_logprobs(x, labels, mask, temperature=0.9, backend=backend).cpu(),
              lengths)
    got.backward()
    xr = logits.detach().cpu().double().requires_grad_(True)
    want = run(xr, lambda x: ref_sft.sequence_logprobs(x, labels.cpu(), mask.cpu(), temperature=0.9), lengths)
    want.backward()
    close(got, want, "loss")
    close(xk.grad, xr.grad, "grad")


# --------------------------------------------------------------------------------------------
# log1mexp and ORPO


def log1mexp_float64(x: float) -> float:
    # Each formula is accurate in float64 on its own side of -ln 2.
    return math.log1p(-math.exp(x)) if x < -LN2 else math.log(-math.expm1(x))


def test_log1mexp_branch_accuracy():
    """fp32 relative error < 1e-6 on both sides of -ln 2; either single formula alone fails one end."""
    xs = [-1e-7, -1e-6, -1e-3, -0.5, -LN2 + 1e-4, -LN2, -LN2 - 1e-4, -1.0, -5.0, -20.0, -50.0, -80.0]
    x = torch.tensor(xs, dtype=torch.float32)
    got = ao.log1mexp(x).double()
    want = torch.tensor([log1mexp_float64(float(v)) for v in x.double()], dtype=torch.float64)
    rel = ((got - want) / want).abs()
    assert rel.max() < 1e-6, rel
    naive_near = torch.log1p(-torch.exp(x)).double()
    naive_far = torch.log(-torch.expm1(x)).double()
    assert ((naive_near - want) / want).abs().max() > 1e-3  # loses x near 0
    assert ((naive_far - want) / want).abs().max() > 1e-3   # loses x far below 0
    # Gradient d/dx log(1 - e^x) = -1 / expm1(-x): finite on both sides, no NaN from the other branch.
    xg = x.double().clone().requires_grad_(True)
    ao.log1mexp(xg).sum().backward()
    torch.testing.assert_close(xg.grad, -1 / torch.expm1(-x.double()), rtol=1e-9, atol=0)


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5), beta=st.floats(0.01, 1.0))
def test_orpo_matches_oracle(seed, b, beta):
    gen = torch.Generator().manual_seed(seed)
    lw = torch.randint(1, 40, (b,), generator=gen)
    ll = torch.randint(1, 40, (b,), generator=gen)
    sw = -(torch.rand(b, generator=gen, dtype=torch.float64) * 3 + 0.01) * lw
    sl = -(torch.rand(b, generator=gen, dtype=torch.float64) * 3 + 0.01) * ll
    swk, slk = sw.float().requires_grad_(True), sl.float().requires_grad_(True)
    out = ao.orpo_loss(swk, slk, lw, ll, beta)
    out.loss.backward()
    swr, slr = sw.float().double().requires_grad_(True), sl.float().double().requires_grad_(True)
    want, z = ref.orpo_loss(swr, slr, lw, ll, beta)
    want.backward()
    close(out.loss, want, "loss")
    close(swk.grad, swr.grad, "grad chosen")
    close(slk.grad, slr.grad, "grad rejected")
    close(out.metrics["log_odds_chosen"], z.mean(), "log_odds_chosen")
    torch.testing.assert_close(out.metrics["nll_loss"], (-sw.sum() / lw.sum()).float())


def test_orpo_z_zero_and_gradient_ratio():
    """docs/methods.md 2.23: equal mean log-probs give z = 0 and an odds term of lambda log 2; the odds
    term's gradients w.r.t. the two means have opposite signs and ratio -(1 - P_l) / (1 - P_w)."""
    beta = 0.25
    lw, ll = torch.tensor([4.0]), torch.tensor([10.0])
    sw = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)  # mean -0.5
    sl = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)  # mean -0.5
    out = ao.orpo_loss(sw, sl, lw, ll, beta, nll_loss=torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(out.loss, torch.tensor(beta * LN2, dtype=torch.float64))
    torch.testing.assert_close(out.metrics["log_odds_chosen"], torch.tensor(0.0))
    # Unequal means for the ratio oracle.
    sw2 = torch.tensor([-1.2], dtype=torch.float64, requires_grad=True)  # mean -0.3
    sl2 = torch.tensor([-15.0], dtype=torch.float64, requires_grad=True)  # mean -1.5
    out = ao.orpo_loss(sw2, sl2, lw, ll, beta, nll_loss=torch.zeros((), dtype=torch.float64))
    out.loss.backward()
    g_mean_w, g_mean_l = sw2.grad * 4, sl2.grad * 10  # d/d mean = L * d/dS
    assert g_mean_w.item() < 0 < g_mean_l.item()
    pw, pl = math.exp(-0.3), math.exp(-1.5)
    assert (g_mean_w / g_mean_l).item() == pytest.approx(-(1 - pl) / (1 - pw), rel=1e-12)
    z = (-0.3 + 1.5) - (math.log1p(-pw) - math.log1p(-pl))
    sig_neg = 1 / (1 + math.exp(z))
    assert g_mean_w.item() == pytest.approx(-beta * sig_neg / (1 - pw), rel=1e-12)


def test_orpo_clamp_near_certain_sequences():
    """Mean log-prob 0 (P = 1) or just below: finite loss and gradient (clamp at -1e-6)."""
    for mean in (0.0, -1e-9, -1e-7):
        sw = torch.tensor([mean * 5], requires_grad=True)
        sl = torch.tensor([-10.0], requires_grad=True)
        out = ao.orpo_loss(sw, sl, torch.tensor([5]), torch.tensor([5]))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(sw.grad).all() and torch.isfinite(sl.grad).all()
    # Above the clamp the odds term has no gradient: only the NLL's -1/L remains.
    torch.testing.assert_close(sw.grad, torch.tensor([-1 / 5]))


def test_orpo_nll_options_and_bf16():
    sw, sl = torch.tensor([-6.0, -2.0]), torch.tensor([-9.0, -3.0])
    lw, ll = torch.tensor([3, 2]), torch.tensor([3, 1])
    base = ao.orpo_loss(sw, sl, lw, ll)
    torch.testing.assert_close(base.metrics["nll_loss"], torch.tensor(8.0 / 5))
    glob = ao.orpo_loss(sw, sl, lw, ll, nll_normalizer=16)
    torch.testing.assert_close(glob.metrics["nll_loss"], torch.tensor(0.5))
    trl = ao.orpo_loss(sw, sl, lw, ll, nll_loss=torch.tensor(3.0))
    torch.testing.assert_close(trl.loss - trl.metrics["nll_loss"], base.loss - base.metrics["nll_loss"])
    half = ao.orpo_loss(sw.bfloat16(), sl.bfloat16(), lw, ll)
    assert half.loss.dtype == torch.float32
    with pytest.raises(ValueError, match="lengths"):
        ao.orpo_loss(sw, sl, None, ll)
    with pytest.raises(ValueError, match="chosen_lengths"):
        ao.orpo_loss(sw, sl, torch.tensor([1]), ll)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        ao.orpo_loss(sw, sl[:1], lw, ll)


# --------------------------------------------------------------------------------------------
# GVPO


@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 3), k=st.integers(2, 5),
       beta=st.floats(0.01, 1.0), use_ids=st.booleans())
def test_gvpo_matches_oracle(seed, groups, k, beta, use_ids):
    gen = torch.Generator().manual_seed(seed)
    b = groups * k
    s = -torch.rand(b, generator=gen, dtype=torch.float64) * 50
    s_anc = s + torch.randn(b, generator=gen, dtype=torch.float64)
    rewards = (torch.rand(b, generator=gen) > 0.5).double()
    ids = torch.arange(b) // k
    if use_ids:
        perm = torch.randperm(b, generator=gen)
        s, s_anc, rewards, ids = s[perm], s_anc[perm], rewards[perm], ids[perm] * 7 - 3
    sk = s.float().requires_grad_(True)
    kwargs = dict(group_ids=ids) if use_ids else dict(group_size=k)
    out = ao.gvpo_loss(sk, s_anc.float(), rewards, beta=beta, **kwargs)
    out.loss.backward()
    sr = s.float().double().requires_grad_(True)
    want = ref.gvpo_loss(sr, s_anc.float().double(), rewards, ids, beta)
    want.backward()
    close(out.loss, want, "loss")
    close(sk.grad, sr.grad, "grad")


def test_gvpo_at_anchor():
    """docs/methods.md 2.14: theta = anchor gives 1/(2(k-1)) sum (R - mean R)^2 (0.25 for R = [1, 0]) and
    gradient -beta/(k-1) (R_i - mean R) w.r.t. S_i."""
    s = torch.tensor([-3.0, -8.0], dtype=torch.float64, requires_grad=True)
    out = ao.gvpo_loss(s, s.detach().clone(), torch.tensor([1.0, 0.0]), group_size=2, beta=0.1)
    torch.testing.assert_close(out.loss, torch.tensor(0.25, dtype=torch.float64))
    out.loss.backward()
    torch.testing.assert_close(s.grad, torch.tensor([-0.05, 0.05], dtype=torch.float64))
    r = torch.tensor([1.0, 0.0, 0.0, 3.0])
    s4 = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    out = ao.gvpo_loss(s4, s4.detach(), r, group_size=4, beta=0.5)
    out.loss.backward()
    centred = r - r.mean()
    torch.testing.assert_close(out.loss, (centred**2).sum() / 6)
    torch.testing.assert_close(s4.grad, -0.5 / 3 * centred)


def test_gvpo_token_input_reduction_and_errors():
    gen = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, generator=gen, dtype=torch.float64)
    anchor = logp + 0.1 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    tok = ao.gvpo_loss(logp, anchor, rewards, mask=mask, group_size=2)
    seq = ao.gvpo_loss((logp * mask).sum(-1), (anchor * mask).sum(-1), rewards, group_size=2)
    torch.testing.assert_close(tok.loss, seq.loss)
    summed = ao.gvpo_loss((logp * mask).sum(-1), (anchor * mask).sum(-1), rewards, group_size=2,
                          agg="sum")
    torch.testing.assert_close(summed.loss, 2 * seq.loss)
    s = torch.zeros(4)
    with pytest.raises(ValueError, match="group_size"):
        ao.gvpo_loss(s, s, rewards, group_size=1)
    with pytest.raises(ValueError, match="group_size"):
        ao.gvpo_loss(s, s, rewards, group_size=3)
    with pytest.raises(ValueError, match="k >= 2"):
        ao.gvpo_loss(s, s, rewards, group_ids=torch.tensor([0, 0, 0, 1]))
    with pytest.raises(ValueError, match="exactly one"):
        ao.gvpo_loss(s, s, rewards)
    with pytest.raises(ValueError, match="anchor_logp"):
        ao.gvpo_loss(s, torch.zeros(3), rewards, group_size=2)
    with pytest.raises(ValueError, match="mask"):
        ao.gvpo_loss(logp, anchor, rewards, group_size=2)
    with pytest.raises(ValueError, match="agg"):
        ao.gvpo_loss(s, s, rewards, group_size=2, agg="none")


# --------------------------------------------------------------------------------------------
# RAHF


def _hidden(layers, b, t, h, gen, dtype=torch.float64):
    return [torch.randn(b, t, h, generator=gen, dtype=torch.float64).to(dtype) for _ in range(layers)]


@pytest.mark.parametrize("count_padding", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_rahf_matches_oracle(count_padding, stacked):
    gen = torch.Generator().manual_seed(4)
    lora = [x.float().requires_grad_(True) for x in _hidden(3, 2, 5, 8, gen)]
    base, v = _hidden(3, 2, 5, 8, gen), _hidden(3, 2, 5, 8, gen)
    mask = torch.rand(2, 5, generator=gen) > 0.4
    mask[0, 0] = True
    arg = torch.stack(lora) if stacked else lora
    out = ao.rahf_loss(arg, [x.float() for x in base], [x.float() for x in v], mask, alpha=5.0,
                       count_padding=count_padding)
    out.loss.backward()
    lr = [x.detach().double().requires_grad_(True) for x in lora]
    want = ref.rahf_loss(lr, [x.float().double() for x in base], [x.float().double() for x in v],
                         mask, 5.0, count_padding)
    want.backward()
    close(out.loss, want, "loss")
    for a, r in zip(lora, lr):
        close(a.grad, r.grad, "grad")
    assert out.losses.shape == (3,) and set(out.metrics) == {"layer/0", "layer/1", "layer/2"}


def test_rahf_zero_with_alpha_zero_and_fresh_lora():
    """docs/methods.md 2.26: alpha = 0 and a fresh LoRA (B = 0) give loss exactly 0 and a finite, zero
    gradient (the L2 norm is not differentiable at 0; vector_norm's subgradient is 0)."""
    gen = torch.Generator().manual_seed(5)
    hid, rank = 16, 4
    w = torch.randn(hid, hid, generator=gen)
    lora_a = (torch.randn(rank, hid, generator=gen) * 0.1).requires_grad_(True)
    lora_b = torch.zeros(hid, rank, requires_grad=True)
    x = torch.randn(2, 6, hid, generator=gen)
    base = [x @ w.T, torch.tanh(x @ w.T)]
    lora = [x @ w.T + (x @ lora_a.T) @ lora_b.T, torch.tanh(x @ w.T + (x @ lora_a.T) @ lora_b.T)]
    v = [torch.randn(2, 6, hid, generator=gen) for _ in range(2)]
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = ao.rahf_loss(lora, base, v, mask, alpha=0.0)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(lora_b.grad).all() and (lora_b.grad == 0).all()


def test_rahf_left_padding_invariance_and_compat_dilution():
    gen = torch.Generator().manual_seed(6)
    lora, base, v = (_hidden(2, 1, 4, 8, gen) for _ in range(3))
    loss = ao.rahf_loss(lora, base, v, torch.ones(1, 4, dtype=torch.bool), alpha=2.0).loss
    pad = lambda xs: [torch.cat([torch.randn(1, 3, 8, generator=gen, dtype=torch.float64), x], 1) for x in xs]  # noqa: E731
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    padded = ao.rahf_loss(pad(lora), pad(base), pad(v), mask, alpha=2.0).loss
    torch.testing.assert_close(padded, loss)
    diluted = ao.rahf_loss(pad(lora), pad(base), pad(v), mask, alpha=2.0, count_padding=True).loss
    torch.testing.assert_close(diluted, loss * 4 / 7)


def test_rahf_bf16_and_bad_input():
    gen = torch.Generator().manual_seed(7)
    lora, base, v = (_hidden(2, 2, 3, 4, gen, torch.bfloat16) for _ in range(3))
    out = ao.rahf_loss(lora, base, v, alpha=1.0)
    assert out.loss.dtype == torch.float32
    want = ref.rahf_loss([x.double() for x in lora], [x.double() for x in base], [x.double() for x in v],
                         None, 1.0)
    close(out.loss, want, "bf16 inputs, fp32 math")
    empty = ao.rahf_loss(lora, base, v, torch.zeros(2, 3, dtype=torch.bool))
    assert empty.loss.item() == 0
    with pytest.raises(ValueError, match="base_hidden"):
        ao.rahf_loss(lora, base[:1] * 2 + [base[0][:, :2]], v)
    with pytest.raises(ValueError, match="direction"):
        ao.rahf_loss(torch.stack(lora), torch.stack(base), torch.stack(v)[:1])
    with pytest.raises(ValueError, match="mask"):
        ao.rahf_loss(lora, base, v, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="alpha"):
        ao.rahf_loss(lora, base, v, alpha=float("nan"))
    with pytest.raises(TypeError, match="lora_hidden"):
        ao.rahf_loss("h", base, v)

