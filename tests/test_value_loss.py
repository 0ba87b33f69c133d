"""ao.value_loss (PPO's clipped critic loss) against an independent numpy float64 oracle."""

import numpy as np
import pytest
import torch

import alignops as ao


def oracle(v, v_old, ret, mask, clip, agg, normalizer=None, max_len=None):
    v, v_old, ret, m = (np.asarray(x, dtype=np.float64) for x in (v, v_old, ret, mask))
    un = (v - ret) ** 2
    per = un if clip is None else np.maximum(un, (v_old + np.clip(v - v_old, -clip, clip) - ret) ** 2)
    per = per * m
    if agg == "token-mean":
        num, den = per.sum(), m.sum()
    elif agg == "seq-mean-token-mean":
        L = m.sum(-1)
        num, den = (per.sum(-1) / np.maximum(L, 1)).sum(), (L > 0).sum()
    elif agg == "seq-mean-token-sum":
        num, den = per.sum(), (m.sum(-1) > 0).sum()
    else:
        num, den = per.sum(), (m.sum(-1) > 0).sum() * max_len
    den = den if normalizer is None else normalizer
    return 0.0 if den == 0 else 0.5 * num / den


def inputs(seed, B=5, T=7, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    v_old = v + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    if empty_row:
        mask[1] = False
    return v, v_old, ret, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("clip", [None, 0.2, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_value_loss_matches_oracle_and_gradient(agg, clip, seed):
    v, v_old, ret, mask = inputs(seed)
    v = v.requires_grad_()
    out = ao.value_loss(v, v_old, ret, mask, cliprange_value=clip, agg=agg, max_len=9)
    want = oracle(v.detach(), v_old, ret, mask, clip, agg, max_len=9)
    torch.testing.assert_close(out.loss.item(), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: ao.value_loss(x, v_old, ret, mask, cliprange_value=clip, agg=agg,
                                                            max_len=9).loss, (v.detach().clone().requires_grad_(),))
    out.loss.backward()
    assert torch.all(v.grad[~mask] == 0)


def test_clip_inactive_equals_plain_mse_and_clipped_tokens_get_no_gradient():
    v, _, ret, mask = inputs(0)
    v_old = v + 0.05 * torch.randn_like(v)  # |V - V_old| <= c everywhere: docs/methods.md 2.1 oracle (d)
    a = ao.value_loss(v, v_old, ret, mask, cliprange_value=0.2).loss
    b = ao.value_loss(v, v_old, ret, mask, cliprange_value=None).loss
    torch.testing.assert_close(a, b)
    # far outside the clip range, and the clipped branch the larger: that token's gradient is 0
    v = torch.tensor([[2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = ao.value_loss(v, torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[5.0, 1.0]],
                        dtype=torch.float64), cliprange_value=0.2)
    out.loss.backward()
    assert v.grad[0, 0] == 0 and v.grad[0, 1] != 0
    assert out.metrics["vf_clipfrac"] == 0.5


def test_fp32_all_masked_and_normalizer():
    v, v_old, ret, mask = (x.float() if x.dtype == torch.float64 else x for x in inputs(1))
    out = ao.value_loss(v, v_old, ret, torch.zeros_like(mask))
    assert out.loss.item() == 0.0 and out.loss.dtype == torch.float32
    n = ao.value_loss(v, v_old, ret, mask, normalizer=torch.tensor(3.0)).loss
    torch.testing.assert_close(n.item(), oracle(v, v_old, ret, mask, 0.5, "token-mean", normalizer=3.0), rtol=1e-5, atol=0)


def test_value_loss_bad_input():
    v, v_old, ret, mask = inputs(2)
    with pytest.raises(ValueError, match="returns"):
        ao.value_loss(v, v_old, ret[:, :3], mask)
    with pytest.raises(ValueError, match="cliprange_value"):
        ao.value_loss(v, v_old, ret, mask, cliprange_value=-1.0)
    with pytest.raises(ValueError, match="agg"):
        ao.value_loss(v, v_old, ret, mask, agg="mean")
    with pytest.raises(ValueError, match="values"):
        ao.value_loss(v[0], v_old, ret, mask)
