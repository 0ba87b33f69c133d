"""Distillation against the peers' own installed code, on the same fp32 inputs (CPU):

- TRL 1.16 `GKDTrainer.generalized_jsd_loss` (a static method: no trainer is built): beta 0 (its
  forward KL), 0.1, 0.5, 1 (its reverse KL), temperatures 1 and 2, labels with -100. Values and the
  student logits' gradient.
- Liger 0.8.5 `LigerFusedLinearJSDLoss` (chunked, eager: compiled=False) with weight_hard_loss=0,
  weight_soft_loss=1, against fused_linear_distill_loss: values and the gradients of the student's
  hidden states and weight.

Quirk asserted as such: without labels TRL's "batchmean" divides the sum over every token by the
batch size B (not by the tokens), so it equals alignops's agg="sum" divided by B.

Tolerance: rtol 1e-5 with atol 1e-6 x max(1, |want|) for values, and 1e-5 of the largest |grad| for
gradients (two fp32 computations of the same sums in different orders).
"""

import pytest
import torch

import alignops as ao
from tests.conftest import require_framework

require_framework("trl", "trl")
require_framework("liger-kernel", "liger_kernel")

BETAS = [0.0, 0.1, 0.5, 1.0]


def _trl_jsd():
    from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: PLC0415
    return GKDTrainer.generalized_jsd_loss


def _close(got, want, what):
    got, want = got.detach().double(), want.detach().double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, float(want.abs().max())), msg=what)


def _close_grad(got, want, what):
    scale = float(want.abs().max())
    err = float((got.double() - want.double()).abs().max())
    assert err <= 1e-5 * scale, f"{what}: max |error| {err:.3e}, largest |grad| {scale:.3e}"


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_trl_generalized_jsd(beta, temperature):
    g = torch.Generator().manual_seed(int(beta * 10) + int(temperature))
    B, T, V = 3, 5, 389
    s = torch.randn(B, T, V, generator=g) * 3
    t = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    divergence = "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
    for div in {divergence, "jsd"}:  # beta 0 / 1 also through divergence="jsd"
        a = s.clone().requires_grad_()
        ours = ao.distill_loss(a, t, labels, divergence=div, beta=beta, temperature=temperature, backend="cpu")
        ours.loss.backward()
        b = s.clone().requires_grad_()
        theirs = _trl_jsd()(b, t, labels, beta=beta, temperature=temperature)
        theirs.backward()
        _close(ours.loss, theirs, f"loss, {div} beta={beta}")
        _close_grad(a.grad, b.grad, f"student grad, {div} beta={beta}")


def test_trl_batchmean_without_labels_divides_by_batch():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, 97, generator=g), torch.randn(4, 6, 97, generator=g)
    theirs = _trl_jsd()(s, t, None, beta=0.5)
    ours = ao.distill_loss(s, t, divergence="jsd", beta=0.5, agg="sum", backend="cpu").loss / 4
    _close(ours, theirs, "TRL batchmean without labels = sum / B")
    token_mean = ao.distill_loss(s, t, divergence="jsd", beta=0.5, backend="cpu").loss
    assert not torch.allclose(token_mean, theirs)  # the quirk is real: not the token mean


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_liger_fused_linear_jsd(beta, temperature):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: PLC0415
    g = torch.Generator().manual_seed(int(beta * 10) + 7)
    N, H, Ht, V = 45, 32, 24, 389
    hs = torch.randn(N, H, generator=g)
    ws = torch.randn(V, H, generator=g) / 4
    ht = torch.randn(N, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) / 4
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 7, 30]] = -100
    ours_in = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    divergence = "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
    ours = ao.fused_linear_distill_loss(ours_in[0], ours_in[1], ht, wt, labels, divergence=divergence, beta=beta,
                                        temperature=temperature, chunk_size=16, backend="cpu")
    ours.loss.backward()
    theirs_in = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                    temperature=temperature, compiled=False, chunk_size=16)
    theirs = liger(theirs_in[0], theirs_in[1], ht, wt, labels)
    theirs.backward()
    _close(ours.loss, theirs, f"loss beta={beta}")
    for name, a, b in zip(("dhidden", "dweight"), ours_in, theirs_in):
        _close_grad(a.grad, b.grad, f"{name} beta={beta}")
