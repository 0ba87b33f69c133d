"""One name per concept (docs/glossary.md): every renamed keyword raises a TypeError naming the new one,
and the new one works; the return convention (a tensor, or a result object with named fields)."""

import re
from pathlib import Path

import pytest
import torch

import alignops as ao
from alignops._validate import old_keyword_error

GLOSSARY = Path(__file__).resolve().parents[1] / "docs" / "glossary.md"


def _logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (2, 3), generator=g)


def _head():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (2, 3), generator=g))


def _values():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(2, 3, generator=g, dtype=torch.float64)
    return v, v + 0.1, torch.randn(2, 3, generator=g, dtype=torch.float64)


def _gvpo():
    s = torch.tensor([-1.0, -2.0, -1.5, -0.5], dtype=torch.float64)
    return s, s.detach() - 0.1, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)


def _awpo():
    return torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), torch.rand(8, generator=torch.Generator().manual_seed(3))


def _whiten_x():
    return torch.randn(2, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


# (function name, old keyword, new keyword, call(keyword, value), value)
RENAMES = [
    ("token_logprobs", "return_entropy", "compute_entropy",
     lambda k, v: ao.token_logprobs(*_logits(), **{k: v}), True),
    ("fused_linear_token_logprobs", "return_entropy", "compute_entropy",
     lambda k, v: ao.fused_linear_token_logprobs(*_head(), **{k: v}), True),
    ("sequence_logprobs", "reduction", "agg",
     lambda k, v: ao.sequence_logprobs(*_logits(), **{k: v}), "mean"),
    ("fused_linear_sequence_logprobs", "reduction", "agg",
     lambda k, v: ao.fused_linear_sequence_logprobs(*_head(), **{k: v}), "mean"),
    ("gvpo_loss", "reduction", "agg",
     lambda k, v: ao.gvpo_loss(*_gvpo(), group_size=2, **{k: v}), "sum"),
    ("value_loss", "clip_range", "cliprange_value",
     lambda k, v: ao.value_loss(*_values(), **{k: v}), 0.2),
    ("awpo_advantages", "clip_eps_min", "clip_low_min",
     lambda k, v: ao.awpo_advantages(*_awpo(), 4, **{k: v}), 0.05),
    ("awpo_advantages", "clip_eps_max", "clip_low_max",
     lambda k, v: ao.awpo_advantages(*_awpo(), 4, **{k: v}), 0.3),
    ("awpo_advantages", "eps_std", "ratio_eps",
     lambda k, v: ao.awpo_advantages(*_awpo(), 4, **{k: v}), 1e-5),
    ("masked_whiten", "eps", "var_eps", lambda k, v: ao.masked_whiten(_whiten_x(), **{k: v}), 1e-6),
    ("masked_whiten", "eps_mode", "var_eps_mode", lambda k, v: ao.masked_whiten(_whiten_x(), **{k: v}), "floor"),
    ("gae_advantages", "eps", "var_eps",
     lambda k, v: ao.gae_advantages(_whiten_x(), _whiten_x(), whiten=True, **{k: v}), 1e-6),
    ("gae_advantages", "eps_mode", "var_eps_mode",
     lambda k, v: ao.gae_advantages(_whiten_x(), _whiten_x(), whiten=True, **{k: v}), "floor"),
    ("reinforce_pp_advantages", "eps", "var_eps",
     lambda k, v: ao.reinforce_pp_advantages(torch.tensor([1.0, 0.0]), shape=(2, 5), **{k: v}), 1e-6),
    ("reinforce_pp_advantages", "eps_mode", "var_eps_mode",
     lambda k, v: ao.reinforce_pp_advantages(torch.tensor([1.0, 0.0]), shape=(2, 5), **{k: v}), "floor"),
    ("reinforce_pp_baseline_advantages", "eps", "var_eps",
     lambda k, v: ao.reinforce_pp_baseline_advantages(torch.tensor([1.0, 0.0]), None, 2, shape=(2, 5), **{k: v}),
     1e-6),
    ("reinforce_pp_baseline_advantages", "eps_mode", "var_eps_mode",
     lambda k, v: ao.reinforce_pp_baseline_advantages(torch.tensor([1.0, 0.0]), None, 2, shape=(2, 5), **{k: v}),
     "floor"),
]


@pytest.mark.parametrize("fn,old,new,call,value", RENAMES, ids=[f"{r[0]}-{r[1]}" for r in RENAMES])
def test_old_keyword_raises_naming_the_new_one(fn, old, new, call, value):
    with pytest.raises(TypeError, match=re.escape(f"{fn}() got the old keyword '{old}': it is now '{new}'")):
        call(old, value)
    call(new, value)  # the new name works
    assert getattr(ao, fn).renamed_keywords[old] == new
    assert str(old_keyword_error(fn, old, new)).endswith("(docs/glossary.md)")


@pytest.mark.parametrize("fn,old,new,call,value", RENAMES, ids=[f"{r[0]}-{r[1]}" for r in RENAMES])
def test_glossary_lists_every_rename(fn, old, new, call, value):
    text = GLOSSARY.read_text()
    assert f"`{new}`" in text and f"`{old}`" in text, (fn, old, new)


def test_new_names_compute_what_the_old_ones_did():
    """The renamed keywords keep their meaning: values against direct formulas."""
    x, y = _logits()
    logp, ent = ao.token_logprobs(x, y, compute_entropy=True)
    lsm = torch.log_softmax(x, -1)
    torch.testing.assert_close(logp, lsm.gather(-1, y[..., None])[..., 0])
    torch.testing.assert_close(ent, -(lsm.exp() * lsm).sum(-1))
    torch.testing.assert_close(ao.sequence_logprobs(x, y, agg="mean"), logp.mean(-1))
    v, v_old, ret = _values()
    c = 0.05
    clipped = v_old + (v - v_old).clamp(-c, c)
    want = 0.5 * torch.maximum((v - ret).square(), (clipped - ret).square()).mean()
    torch.testing.assert_close(ao.value_loss(v, v_old, ret, cliprange_value=c).loss, want)
    xw = _whiten_x()
    var = xw.var()
    torch.testing.assert_close(ao.masked_whiten(xw, var_eps=0.5, var_eps_mode="floor"),
                               (xw - xw.mean()) / var.clamp_min(0.5).sqrt())


def test_return_convention_named_results_still_unpack():
    x, y = _logits()
    out = ao.token_logprobs(x, y, compute_entropy=True)
    assert isinstance(out, ao.TokenLogprobs) and out._fields == ("logp", "entropy")
    logp, entropy = out
    assert logp is out.logp and entropy is out.entropy
    assert isinstance(ao.token_logprobs(x, y), torch.Tensor)
    h, w, yh = _head()
    assert isinstance(ao.fused_linear_token_logprobs(h, w, yh, compute_entropy=True), ao.TokenLogprobs)
    seq = ao.sequence_logprobs(x, y, return_lengths=True)
    assert isinstance(seq, ao.SequenceLogprobs) and seq._fields == ("logp", "lengths")
    s, n = seq
    assert n.dtype == torch.int64 and s is seq.logp
    assert isinstance(ao.fused_linear_sequence_logprobs(h, w, yh, return_lengths=True), ao.SequenceLogprobs)
    vl = ao.value_loss(*_values())
    assert isinstance(vl, ao.ValueLossOutput) and not isinstance(vl, ao.PolicyLossOutput)
    assert set(vl.metrics) == {"vf_loss", "vf_clipfrac", "vpred_mean", "explained_variance"}
    # every loss's result object has .loss and .metrics
    for out in (vl, ao.gvpo_loss(*_gvpo(), group_size=2), ao.policy_loss(-torch.rand(2, 3), None, torch.ones(2))):
        assert out.loss.dim() == 0 and isinstance(out.metrics, dict)


def test_awpo_result_field_renamed():
    out = ao.awpo_advantages(*_awpo(), 4)
    assert out._fields[-1] == "clip_low"
    with pytest.raises(TypeError, match="it is now 'clip_low'"):
        out.clip_eps  # noqa: B018


# ---- the trainer's options

def test_trainer_old_options_raise_naming_the_new_one():
    pytest.importorskip("transformers")
    from alignops.train.presets import make_config

    with pytest.raises(TypeError, match=re.escape("--delta is an old option name: it is now --clip_ratio_c")):
        make_config("grpo", {"delta": "3.0"})
    assert make_config("grpo", {"clip_ratio_c": "3.0"}).clip_ratio_c == 3.0
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        with pytest.raises(TypeError, match=re.escape(f"the aggregation is now --agg (--agg {agg})")):
            make_config("grpo", {"loss_type": agg})
        assert make_config("grpo", {"agg": agg}).agg == agg


def test_trainer_aliases_are_peer_names_with_the_same_meaning():
    pytest.importorskip("transformers")
    from alignops.train.presets import make_config

    cfg = make_config("grpo", {"entropy_coeff": "0.01", "dual_clip": "3.0", "loss_agg_mode": "seq-mean-token-sum"})
    assert (cfg.entropy_coef, cfg.clip_ratio_c, cfg.agg) == (0.01, 3.0, "seq-mean-token-sum")
    assert make_config("grpo", {"entropy_coef": "0.02"}).entropy_coef == 0.02


def test_trainer_loss_type_has_trls_meaning():
    pytest.importorskip("transformers")
    from alignops.train.config import TRL_LOSS_TYPES
    from alignops.train.presets import make_config

    for loss_type, (method, agg) in TRL_LOSS_TYPES.items():
        cfg = make_config("dapo", {"loss_type": loss_type})
        assert (cfg.loss_type, cfg.agg) == (loss_type, agg)
        assert cfg.loss_method == (method or make_config("dapo").loss_method)
    with pytest.raises(ValueError, match="give one"):
        make_config("grpo", {"loss_type": "grpo", "agg": "token-mean"})
    with pytest.raises(ValueError, match="give one"):
        make_config("grpo", {"loss_type": "cispo", "loss_method": "ppo"})
    with pytest.raises(ValueError, match="TRL's loss types"):
        make_config("grpo", {"loss_type": "vespo"})


def test_trainer_cli_old_flag_reaches_the_error():
    pytest.importorskip("transformers")
    import argparse

    from alignops.train.config import add_config_arguments
    from alignops.train.presets import make_config

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(TypeError, match="--clip_ratio_c"):
        make_config("grpo", vars(parser.parse_args(["--delta", "3"])))
    assert make_config("grpo", vars(parser.parse_args(["--agg", "seq-mean-token-mean"]))).agg == "seq-mean-token-mean"
