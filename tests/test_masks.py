"""Masks are masks: every public op that takes a mask accepts bool, or 0/1 of any dtype, and the
result is the bool mask's, bit for bit; any other value (0.5, 2.0, an integer 3, NaN) is a
ValueError naming the argument. The values are checked on CPU tensors always, on GPU tensors only
with validate_mask=True (a check there costs a host sync). An all-zero mask is a valid input with
a finite answer. (alignops.layout.check_mask; before it, a weight passed as the mask was silently
read as mask != 0.)"""

import math

import pytest
import torch

import alignops as ao
from alignops.layout import POLICY_MASK_WEIGHTS, check_mask, token_mask

B, T, V, L, H = 4, 6, 11, 2, 3
HAS_CUDA = torch.cuda.is_available()


def inputs(dev):
    g = torch.Generator().manual_seed(0)
    x = {
        "logp": -3 * torch.rand(B, T, generator=g),
        "old": -3 * torch.rand(B, T, generator=g),
        "ref": -3 * torch.rand(B, T, generator=g),
        "adv": torch.randn(B, generator=g),
        "values": torch.randn(B, T, generator=g),
        "old_values": torch.randn(B, T, generator=g),
        "returns": torch.randn(B, T, generator=g),
        "logits": torch.randn(B, T, V, generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "scores": torch.randn(B, generator=g),
        "greedy": torch.randn(B, generator=g),
        "tok_rewards": torch.randn(B, T, generator=g),
        "hidden": torch.randn(L, B, T, H, generator=g),
        "base": torch.randn(L, B, T, H, generator=g),
        "direction": torch.randn(L, B, T, H, generator=g),
        "expert": torch.tensor([True, False, True, False]),
    }
    return {k: v.to(dev) for k, v in x.items()}


def base_mask(dev="cpu"):
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 4:] = False
    m[1, :2] = False
    m[2, 3] = False
    return m.to(dev)


def outputs(out):
    """The tensors an op returns, flattened (loss, per-item losses, metrics in name order)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, tuple):
        return tuple(t for o in out for t in outputs(o))
    tensors = [out.loss]
    if getattr(out, "losses", None) is not None:
        tensors.append(out.losses)
    tensors += [out.metrics[k] for k in sorted(out.metrics)]
    return tuple(tensors)


# name -> fn(x, mask, **kw); every one passes `mask` as its argument named "mask"
OPS = {
    "policy_loss": lambda x, m, **kw: ao.policy_loss(x["logp"], x["old"], x["adv"], m, ref_logp=x["ref"],
                                                     kl_coef=0.1, **kw),
    "policy_loss/seq-mean": lambda x, m, **kw: ao.policy_loss(x["logp"], x["old"], x["adv"], m, method="gspo",
                                                              **kw),
    "value_loss": lambda x, m, **kw: ao.value_loss(x["values"], x["old_values"], x["returns"], m, **kw),
    "sequence_logprobs": lambda x, m, **kw: ao.sequence_logprobs(x["logits"], x["labels"], m, return_lengths=True,
                                                                 **kw),
    "sequence_logprobs/mean": lambda x, m, **kw: ao.sequence_logprobs(x["logits"], x["labels"], m,
                                                                      agg="mean", **kw),
    "sft_loss": lambda x, m, **kw: ao.sft_loss(x["logits"], x["labels"], m, weighting="dft", **kw),
    "chord_loss": lambda x, m, **kw: ao.chord_loss(x["logp"], x["old"], x["adv"], m, x["expert"], 0.3, **kw),
    "gvpo_loss": lambda x, m, **kw: ao.gvpo_loss(x["logp"], x["old"], x["scores"], mask=m, group_size=2, **kw),
    "rahf_loss": lambda x, m, **kw: ao.rahf_loss(x["hidden"], x["base"], x["direction"], m, **kw),
    "masked_mean": lambda x, m, **kw: ao.masked_mean(x["values"], m, **kw),
    "masked_mean/dim": lambda x, m, **kw: ao.masked_mean(x["values"], m, dim=-1, **kw),
    "masked_var": lambda x, m, **kw: ao.masked_var(x["values"], m, **kw),
    "masked_whiten": lambda x, m, **kw: ao.masked_whiten(x["values"], m, **kw),
    "gae_advantages": lambda x, m, **kw: ao.gae_advantages(x["tok_rewards"], x["values"], m, lam=0.9,
                                                           whiten=True, **kw),
    "k1_penalty": lambda x, m, **kw: ao.k1_penalty(x["old"], x["ref"], m, **kw),
    "token_level_rewards": lambda x, m, **kw: ao.token_level_rewards(x["scores"], m, kl=x["old"] - x["ref"],
                                                                     kl_coef=0.1, **kw),
    "kl_penalized_scores": lambda x, m, **kw: ao.kl_penalized_scores(x["scores"], x["old"], x["ref"], m,
                                                                     kl_coef=0.1, **kw),
    "reinforce_pp_advantages": lambda x, m, **kw: ao.reinforce_pp_advantages(x["scores"], m, **kw),
    "reinforce_pp_advantages/kl": lambda x, m, **kw: ao.reinforce_pp_advantages(
        x["scores"], m, old_logp=x["old"], ref_logp=x["ref"], kl_coef=0.1, **kw),
    "reinforce_pp_baseline_advantages": lambda x, m, **kw: ao.reinforce_pp_baseline_advantages(x["scores"], m, 2,
                                                                                               **kw),
    "remax_advantages": lambda x, m, **kw: ao.remax_advantages(x["tok_rewards"], x["greedy"], m, **kw),
    "dler_advantages": lambda x, m, **kw: ao.dler_advantages(x["scores"], 2, mask=m, **kw),
}
# where the op's error points for weights (None: just "a mask is not a weight")
WEIGHTS_HINT = {"policy_loss": "rollout_is_weights", "policy_loss/seq-mean": "rollout_is_weights",
                "chord_loss": "rollout_is_weights", "sft_loss": "seq_weights", "dler_advantages": "lengths",
                "value_loss": "value_loss takes no per-token weights"}

VALID_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]


def bad_masks(dev="cpu"):
    """(what, mask, the value the error names) for each kind of non-mask."""
    m = base_mask(dev)
    half = m.float()
    half[2, 1] = 0.5
    two = m.float()
    two[1, 3] = 2.0
    three = m.long()
    three[3, 0] = 3
    nan = m.float()
    nan[0, 2] = math.nan
    neg = m.to(torch.int32)
    neg[2, 2] = -1
    return [("float 0.5", half, "0.5 at index (2, 1)"), ("float 2.0", two, "2.0 at index (1, 3)"),
            ("int 3", three, "3 at index (3, 0)"), ("NaN", nan, "nan at index (0, 2)"),
            ("int -1", neg, "-1 at index (2, 2)")]


def same(a, b, what):
    a, b = outputs(a), outputs(b)
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and torch.equal(x, y), (what, i, x, y)


@pytest.mark.parametrize("op", list(OPS))
def test_bad_mask_raises(op):
    x = inputs("cpu")
    for what, m, found in bad_masks():
        with pytest.raises(ValueError, match=r"^mask must hold only 0 and 1 \(or False/True\), found ") as e:
            OPS[op](x, m)
        msg = str(e.value)
        assert found in msg, (op, what, msg)
        if what == "NaN":
            assert "weight" not in msg, msg
        else:
            assert "a mask is not a weight" in msg, msg
            if op in WEIGHTS_HINT:
                assert WEIGHTS_HINT[op] in msg, msg


@pytest.mark.parametrize("op", list(OPS))
def test_zero_one_masks_give_the_bool_result(op):
    x = inputs("cpu")
    m = base_mask()
    want = OPS[op](x, m)
    for dtype in VALID_DTYPES:
        same(OPS[op](x, m.to(dtype)), want, (op, dtype))
    same(OPS[op](x, m.float(), validate_mask=True), want, (op, "validate_mask=True"))
    same(OPS[op](x, m, validate_mask=True), want, (op, "bool, validate_mask=True"))


@pytest.mark.parametrize("op", list(OPS))
def test_validate_mask_false_skips_the_check(op):
    x = inputs("cpu")
    _, m, _ = bad_masks()[0]
    OPS[op](x, m, validate_mask=False)  # the old reading, mask != 0; no error


@pytest.mark.parametrize("op", list(OPS))
def test_all_masked_is_finite(op):
    x = inputs("cpu")
    for m in (torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T)):
        for t in outputs(OPS[op](x, m)):
            assert bool(torch.isfinite(t.float()).all()), (op, m.dtype, t)


def test_validate_mask_must_be_a_bool():
    x = inputs("cpu")
    with pytest.raises(TypeError, match="validate_mask must be True, False or None"):
        OPS["policy_loss"](x, base_mask().float(), validate_mask=1)


def test_chord_expert_mask():
    x = inputs("cpu")
    m = base_mask()
    want = ao.chord_loss(x["logp"], x["old"], x["adv"], m, x["expert"], 0.3)
    for dtype in VALID_DTYPES:
        same(ao.chord_loss(x["logp"], x["old"], x["adv"], m, x["expert"].to(dtype), 0.3), want, dtype)
    for bad, found in ((torch.tensor([1.0, 0.0, 0.5, 0.0]), "0.5 at index 2"),
                       (torch.tensor([2, 0, 1, 0]), "2 at index 0"),
                       (torch.tensor([1.0, math.nan, 1.0, 0.0]), "nan at index 1")):
        with pytest.raises(ValueError, match=r"^expert_mask must hold only 0 and 1") as e:
            ao.chord_loss(x["logp"], x["old"], x["adv"], m, bad, 0.3)
        assert found in str(e.value)


def test_iw_sft_weights_valid_rows():
    q, r = torch.randn(B, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    rows = torch.tensor([True, False, True, True])
    want = ao.iw_sft_weights(q, r, self_normalize=True, valid_rows=rows)
    for dtype in VALID_DTYPES:
        assert torch.equal(ao.iw_sft_weights(q, r, self_normalize=True, valid_rows=rows.to(dtype)), want)
    with pytest.raises(ValueError, match=r"^valid_rows must hold only 0 and 1 .*found 0.5 at index 1"):
        ao.iw_sft_weights(q, r, self_normalize=True, valid_rows=torch.tensor([1.0, 0.5, 1.0, 1.0]))


def test_check_mask_helper():
    m = base_mask()
    assert check_mask(None) is None
    assert check_mask(m) is m  # bool masks are taken as they are
    assert check_mask(m, m.shape, "cpu", "response_mask", validate=True) is m
    assert torch.equal(check_mask(m.half(), name="response_mask"), m)
    assert torch.equal(token_mask(None, (2, 3), "cpu"), torch.ones(2, 3, dtype=torch.bool))
    assert check_mask(torch.zeros(0, 3), validate=True).shape == (0, 3)
    bad = m.float() * 0.5
    with pytest.raises(ValueError, match=r"^response_mask must hold only 0 and 1 \(or False/True\), found 0.5 "
                                         r"at index \(0, 0\); a mask is not a weight: per-token weights go in "
                                         r"rollout_is_weights=$"):
        check_mask(bad, name="response_mask", weights=POLICY_MASK_WEIGHTS)
    assert torch.equal(check_mask(bad, validate=False), m)  # unchecked: the old reading, mask != 0
    with pytest.raises(ValueError, match="shape"):
        check_mask(m, (B, T + 1))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_mask([[1, 0]])
    with pytest.raises(TypeError, match="validate_mask must be"):
        check_mask(m.float(), validate="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
def test_cuda_checks_only_with_validate(op):
    x = inputs("cuda")
    m = base_mask("cuda")
    want = outputs(OPS[op](x, m))
    for dtype in (torch.float32, torch.int64):
        got = outputs(OPS[op](x, m.to(dtype), validate_mask=True))
        for a, b in zip(got, want):
            assert torch.equal(a, b), (op, dtype)
    for what, bad, found in bad_masks("cuda"):
        OPS[op](x, bad)  # no check (no host sync) by default on a GPU
        with pytest.raises(ValueError, match=r"^mask must hold only 0 and 1") as e:
            OPS[op](x, bad, validate_mask=True)
        assert found in str(e.value), (op, what)
    for t in outputs(OPS[op](x, torch.zeros(B, T, device="cuda"), validate_mask=True)):
        assert bool(torch.isfinite(t.float()).all()), op
