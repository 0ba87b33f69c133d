"""alignops.integrations.openrlhf against OpenRLHF 0.11.2's own losses, called from the installed files.

OpenRLHF's package import needs deepspeed, flash-attn and ray; `openrlhf/models/loss.py` needs only torch and
`masked_mean` from `openrlhf/models/utils.py`, whose module imports deepspeed for helpers never called here.
So both files are loaded on their own, from the installed distribution, into a package of their own.
"""

import importlib.metadata
import importlib.util
import itertools
import sys
import types
from pathlib import Path

import pytest
import torch

import alignops as ao
from alignops.integrations import openrlhf as ao_orl
from tests.conftest import require_framework

require_framework("openrlhf")

ORACLE_PACKAGE = "_openrlhf_installed_models"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def installed():
    """OpenRLHF's openrlhf/models/loss.py and utils.py, as installed."""
    folder = Path(importlib.metadata.distribution("openrlhf").locate_file("openrlhf/models"))
    package = types.ModuleType(ORACLE_PACKAGE)
    package.__path__ = [str(folder)]
    added = {ORACLE_PACKAGE: package}
    if "deepspeed" not in sys.modules:
        added["deepspeed"] = types.ModuleType("deepspeed")
    sys.modules.update(added)
    try:
        utils = _load(f"{ORACLE_PACKAGE}.utils", folder / "utils.py")
        return _load(f"{ORACLE_PACKAGE}.loss", folder / "loss.py"), utils
    finally:
        for name in (*added, f"{ORACLE_PACKAGE}.utils", f"{ORACLE_PACKAGE}.loss"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def theirs(installed):
    return installed[0]


@pytest.fixture(scope="module")
def their_utils(installed):
    return installed[1]


# --------------------------------------------------------------------------------------------
# inputs


def policy_inputs(dtype, seed, b=6, t=7):
    """Log-probs with ratios far past every clip (and past OpenRLHF's +-20 clamp), an empty mask row, a
    one-token row, rows with holes, garbage at masked positions, zero advantages and rollout log-probs
    on both sides of every is_correction gate."""
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(b, t, generator=g, dtype=torch.float64)
    logp = old + 1.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    logp[1, 2], logp[2, 0] = old[1, 2] + 25.0, old[2, 0] - 30.0
    rollout = old + 0.8 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    adv[3, :2] = 0.0
    adv[1, 2] = adv[2, 0] = 1.0               # the +-20 clamp binds on the unclipped branch at [2, 0]
    logp[4, 3] = old[4, 3] + 10.5             # a one-token row whose GSPO log-ratio passes alignops's own cap of 10
    adv[4, 3] = -1e-4                         # (unclipped there, and small enough not to swamp the other tokens)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0] = False
    mask[4] = False
    mask[4, 3] = True
    mask[1, 2] = mask[2, 0] = True
    return dict(log_probs=logp.to(dtype).requires_grad_(), old_log_probs=old.to(dtype),
                advantages=adv.to(dtype), action_mask=mask, rollout_log_probs=rollout.to(dtype))


def tolerances(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}


def assert_same(ours, expected, dtype, what):
    if expected is None:
        assert ours is None, what
        return
    assert ours is not None, what
    torch.testing.assert_close(ours.to(expected.dtype), expected.detach(), **tolerances(dtype), msg=what)


def run(loss_fn, inputs, **kwargs):
    x = inputs["log_probs"].detach().clone().requires_grad_()
    args = {**inputs, "log_probs": x, **kwargs}
    out = loss_fn(**args)
    out[0].backward()
    return out, x.grad


CORRECTIONS = [
    dict(is_correction_level="off"),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_gating="ratio"),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_gating="ratio",
         is_correction_threshold=(0.8, 1.5)),
    dict(is_correction_level="seq", is_correction_mode="mask", is_correction_gating="ratio",
         is_correction_threshold=(0.8, 1.5)),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_gating="binary_kl",
         is_correction_threshold=(0.0, 0.1)),
    dict(is_correction_level="seq", is_correction_mode="mask", is_correction_gating="binary_kl",
         is_correction_threshold=(0.0, 0.2)),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_gating="tv",
         is_correction_threshold=(0.0, 0.2)),
    dict(is_correction_level="seq", is_correction_mode="mask", is_correction_gating="tv",
         is_correction_threshold=(0.0, 0.2)),
]
# dp_size alone is ignored (the local mean), as in OpenRLHF
STEP_COUNTS = [{}, dict(dp_size=3), dict(dp_size=4, batch_num_tokens=torch.tensor(37.0),
                                          global_batch_size=torch.tensor(9.0)),
               dict(dp_size=2, batch_num_tokens=23, global_batch_size=3.0)]


@pytest.mark.parametrize("correction", CORRECTIONS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_policy_loss_equals_openrlhf(theirs, policy_loss_type, token_level_loss, dual_clip, correction):
    config = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level_loss,
                  policy_loss_type=policy_loss_type, **correction)
    reference, ours = theirs.PolicyLoss(**config), ao_orl.PolicyLoss(**config)
    assert ours.token_level_loss == reference.token_level_loss
    with_rollout = [True] if correction["is_correction_level"] != "off" else [True, False]
    for dtype, rollout, (n, counts) in itertools.product((torch.float64, torch.float32), with_rollout,
                                                         enumerate(STEP_COUNTS)):
        seed = n % 2
        inputs = policy_inputs(dtype, seed)
        if not rollout:
            inputs["rollout_log_probs"] = None
        (expected, expected_grad), (got, grad) = run(reference, inputs, **counts), run(ours, inputs, **counts)
        case = f"{dtype} seed={seed} rollout={rollout} counts={counts}"
        for name, e, o in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), expected, got):
            assert_same(o, e, dtype, f"{name}: {case}")
        assert_same(grad, expected_grad, dtype, f"grad: {case}")
        assert grad.abs().sum() > 0, case
        if expected[4] is not None:
            assert 0 < expected[4] < 1, f"the gate keeps or drops everything: {case}"


def test_policy_inputs_reach_every_branch():
    """The inputs above are only a test if they clip on both sides and pass OpenRLHF's +-20 clamp (that they
    straddle the gates is checked on OpenRLHF's is_filter_ratio above)."""
    x = policy_inputs(torch.float64, 0)
    m = x["action_mask"]
    d = (x["log_probs"] - x["old_log_probs"]).detach()[m]
    a = x["advantages"][m]
    assert ((d > 0.5) & (a > 0)).any() and ((d < -0.5) & (a < 0)).any() and (d.abs() > 20).any()
    assert ((d.exp() * a) < 3.0 * a).any()                    # dual clip binds somewhere
    iw = (x["old_log_probs"] - x["rollout_log_probs"])[m].exp()
    assert (iw < 0.8).any() and (iw > 1.5).any() and ((iw > 0.8) & (iw < 1.5)).any()
    assert (m.sum(-1) == 0).any() and (m.sum(-1) == 1).any()


def test_empty_action_mask_is_zero_not_nan(theirs):
    inputs = policy_inputs(torch.float64, 0)
    inputs["action_mask"] = torch.zeros_like(inputs["action_mask"])
    config = dict(is_correction_level="token")
    (expected, _), (got, grad) = run(theirs.PolicyLoss(**config), inputs), run(ao_orl.PolicyLoss(**config), inputs)
    assert torch.isnan(expected[0]) and torch.isnan(expected[2])   # OpenRLHF: 0/0
    for value in got:
        assert torch.equal(value, torch.zeros_like(value)), got
    assert torch.equal(grad, torch.zeros_like(grad))
    # with the step's counts given, OpenRLHF is finite too, and the two agree
    counts = dict(batch_num_tokens=torch.tensor(10.0), dp_size=2)
    (expected, _), (got, _) = run(theirs.PolicyLoss(**config), inputs, **counts), run(ao_orl.PolicyLoss(**config),
                                                                                       inputs, **counts)
    assert got[0] == expected[0] == 0


def test_equal_advantages_give_zero_loss(theirs):
    inputs = policy_inputs(torch.float64, 1)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    (expected, expected_grad), (got, grad) = run(theirs.PolicyLoss(), inputs), run(ao_orl.PolicyLoss(), inputs)
    assert expected[0] == got[0] == 0
    assert torch.equal(grad, expected_grad)


def test_action_mask_none_means_every_token(theirs):
    inputs = policy_inputs(torch.float64, 2)
    inputs["action_mask"] = None
    (expected, expected_grad), (got, grad) = run(theirs.PolicyLoss(), inputs), run(ao_orl.PolicyLoss(), inputs)
    for e, o in zip(expected, got):
        assert_same(o, e, torch.float64, "action_mask=None")
    assert_same(grad, expected_grad, torch.float64, "grad")


def test_float_action_mask(theirs):
    """A 0/1 float mask (OpenRLHF's Experience holds a bool one); fp32 so OpenRLHF's count + 1e-8 rounds away."""
    inputs = policy_inputs(torch.float32, 3)
    inputs["action_mask"] = inputs["action_mask"].float()
    for level in (True, False):
        (expected, eg), (got, g) = (run(theirs.PolicyLoss(token_level_loss=level), inputs),
                                    run(ao_orl.PolicyLoss(token_level_loss=level), inputs))
        for e, o in zip(expected, got):
            assert_same(o, e, torch.float32, f"float mask, token_level_loss={level}")
        assert_same(g, eg, torch.float32, "grad")


# --------------------------------------------------------------------------------------------
# alignops methods through OpenRLHF's interface (oracle: each method's formula, docs/methods.md)


def test_alignops_method_cispo_with_token_is_correction():
    inputs = policy_inputs(torch.float64, 4)
    logp, old, adv, mask, rollout = (inputs[k] for k in ("log_probs", "old_log_probs", "advantages",
                                                         "action_mask", "rollout_log_probs"))
    loss_fn = ao_orl.PolicyLoss(clip_eps_low=1.0, clip_eps_high=0.2, alignops_method="cispo",
                                is_correction_level="token", is_correction_mode="clip",
                                is_correction_threshold=(0.8, 1.5))
    (loss, clip_ratio, ppo_kl, vllm_kl, _), grad = run(loss_fn, inputs, dp_size=2, batch_num_tokens=30)
    x = logp.detach().clone().requires_grad_()
    ratio = torch.exp((x - old).clamp(-20, 20)).detach()
    weight = (old - rollout).exp().clamp(0.8, 1.5)
    m = mask.double()
    expected = (-(weight * ratio.clamp(0.0, 1.2) * adv * x) * m).sum() / 30 * 2
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12)
    clipped = (((ratio > 1.2) & (adv > 0)) | ((ratio < 0.0) & (adv < 0))).double()
    torch.testing.assert_close(clip_ratio.double(), (clipped * m).sum() / m.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(vllm_kl, ((rollout - old) * m).sum() / m.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ppo_kl, ((old - logp.detach()) * m).sum() / m.sum(), rtol=1e-12, atol=1e-12)


def test_alignops_method_sapo_per_sequence():
    inputs = policy_inputs(torch.float64, 5)
    logp, old, adv, mask = (inputs[k] for k in ("log_probs", "old_log_probs", "advantages", "action_mask"))
    loss_fn = ao_orl.PolicyLoss(token_level_loss=False, alignops_method="sapo", sapo_tau_pos=0.5, sapo_tau_neg=2.0)
    (loss, clip_ratio, _, vllm_kl, is_filter_ratio), _ = run(loss_fn, inputs)
    r = torch.exp((logp.detach() - old).clamp(-20, 20))
    tau = torch.where(adv > 0, 0.5, 2.0)
    phi = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * adv
    m = mask.double()
    n = m.sum(-1)
    expected = ((phi * m).sum(-1)[n > 0] / n[n > 0]).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)
    assert clip_ratio == 0 and vllm_kl is None and is_filter_ratio is None


# --------------------------------------------------------------------------------------------
# the other losses


def value_inputs(dtype, seed, b=5, t=6):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    old = values + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    returns = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[1] = False
    return values.to(dtype), old.to(dtype), returns.to(dtype), mask


@pytest.mark.parametrize("counts", STEP_COUNTS, ids=["local", "dp_size-only", "tensor-counts", "number-counts"])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_sft_and_aggregate_equal_openrlhf(theirs, dtype, token_level_loss, counts):
    values, old, returns, mask = value_inputs(dtype, 0)
    for clip_eps in (None, 0.2):
        results = []
        for module in (theirs, ao_orl):
            v = values.clone().requires_grad_()
            loss = module.ValueLoss(clip_eps, token_level_loss)(v, old, returns, action_mask=mask, **counts)
            loss.backward()
            results.append((loss, v.grad))
        for e, o in zip(*results):
            assert_same(o, e, dtype, f"ValueLoss clip_eps={clip_eps}")
    results = []
    for module in (theirs, ao_orl):
        x = values.clone().requires_grad_()
        sft = module.SFTLoss(token_level_loss)(x, mask, **counts)
        agg = module.aggregate_loss(x.exp(), mask, token_level_loss, **counts)
        (sft + agg).backward()
        results.append((sft, agg, x.grad))
    for e, o in zip(*results):
        assert_same(o, e, dtype, "SFTLoss / aggregate_loss")


@pytest.mark.parametrize("ipo,label_smoothing", [(False, 0.0), (False, 0.2), (True, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dpo_loss_equals_openrlhf(theirs, dtype, ipo, label_smoothing):
    g = torch.Generator().manual_seed(7)
    logps = [-20 * torch.rand(8, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
    logps[1][0] = logps[0][0]                      # a tie between chosen and rejected
    results = []
    for module in (theirs, ao_orl):
        chosen, rejected = logps[0].clone().requires_grad_(), logps[1].clone().requires_grad_()
        loss, chosen_rewards, rejected_rewards = module.DPOLoss(0.1, label_smoothing, ipo)(
            chosen, rejected, logps[2], logps[3])
        loss.backward()
        results.append((loss, chosen_rewards, rejected_rewards, chosen.grad, rejected.grad))
    for e, o in zip(*results):
        assert_same(o, e, dtype, f"DPOLoss ipo={ipo} label_smoothing={label_smoothing}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpt_lm_loss_equals_openrlhf(theirs, dtype):
    g = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(3, 9, 37, generator=g, dtype=torch.float64)).to(dtype)
    logits[0, 2, 5] = 60.0                         # a peaked row
    labels = torch.randint(0, 37, (3, 9), generator=g)
    labels[1, 4:] = -100
    labels[2, 0] = 5                               # position 0 is never a target after the shift
    results = []
    for module in (theirs, ao_orl):
        z = logits.clone().requires_grad_()
        loss = module.GPTLMLoss()(z, labels)
        loss.backward()
        results.append((loss, z.grad))
    for e, o in zip(*results):
        assert_same(o, e, dtype, "GPTLMLoss")
    z = logits.clone().requires_grad_()
    loss = ao_orl.GPTLMLoss()(z, torch.full_like(labels, -100))
    loss.backward()
    assert loss == 0 and torch.equal(z.grad, torch.zeros_like(z))
    assert torch.isnan(theirs.GPTLMLoss()(logits, torch.full_like(labels, -100)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_actor_logits_functions_equal_openrlhf(their_utils, dtype, temperature):
    """The Actor's log_probs_from_logits (OpenRLHF's fallback without flash-attn) and compute_entropy."""
    g = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(2, 5, 29, generator=g, dtype=torch.float64)).to(dtype)
    logits[1, 3, 7] = 80.0                         # a peaked row
    labels = torch.randint(0, 29, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for module in (their_utils, ao_orl):
        z = logits.clone().requires_grad_()
        # OpenRLHF's divides its argument in place by the temperature, which autograd refuses on a leaf
        logp = module.log_probs_from_logits(z * 1.0, labels, temperature=temperature)
        entropy = module.compute_entropy(z / temperature)
        (logp * weights + entropy * weights.flip(0)).sum().backward()
        results.append((logp, entropy, z.grad))
    for e, o in zip(*results):
        assert_same(o, e, dtype, f"logits functions, temperature={temperature}")
    z = logits.clone()
    ao_orl.log_probs_from_logits(z, labels, temperature=temperature)
    assert torch.equal(z, logits)


# --------------------------------------------------------------------------------------------
# use_alignops


def test_use_alignops_swaps_the_actors_policy_loss(theirs, their_utils):
    # A stand-in for openrlhf/trainer/ray/ppo_actor.py, which does `from openrlhf.models import Actor,
    # PolicyLoss, aggregate_loss` and builds PolicyLoss(clip_eps_low=..., ...) in ActorPPOTrainer.__init__.
    actor = types.ModuleType("ppo_actor")
    actor.PolicyLoss, actor.aggregate_loss = theirs.PolicyLoss, theirs.aggregate_loss
    modules = [theirs, their_utils, actor]
    original = {(m, name): getattr(m, name) for m in modules for name in ao_orl.REPLACEMENTS if hasattr(m, name)}
    assert {name for _, name in original} == set(ao_orl.REPLACEMENTS)
    actor_kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=None, token_level_loss=True,
                        policy_loss_type="ppo", is_correction_level="token", is_correction_mode="mask",
                        is_correction_gating="ratio", is_correction_threshold=[0.5, 5.0])
    inputs = policy_inputs(torch.float32, 6)
    expected, _ = run(theirs.PolicyLoss(**actor_kwargs), inputs)

    with ao_orl.use_alignops(modules=modules) as patch:
        assert patch.active
        for module, name in original:
            assert getattr(module, name) is ao_orl.REPLACEMENTS[name]
        got, _ = run(actor.PolicyLoss(**actor_kwargs), inputs)
        for e, o in zip(expected, got):
            assert_same(o, e, torch.float32, "patched PolicyLoss")
    assert not patch.active
    for (module, name), value in original.items():
        assert getattr(module, name) is value

    patch = ao_orl.use_alignops("cispo", modules=[actor])
    try:
        built = actor.PolicyLoss(**{**actor_kwargs, "clip_eps_low": 1.0, "clip_eps_high": 0.2})
        assert isinstance(built, ao_orl.PolicyLoss) and built.method == "cispo"
        with pytest.raises(ValueError, match="policy_loss_type or alignops_method"):
            actor.PolicyLoss(**{**actor_kwargs, "policy_loss_type": "gspo"})
        inner = ao_orl.use_alignops(modules=[actor])
        with pytest.raises(RuntimeError, match="out of order"):
            patch.restore()
        inner.restore()
    finally:
        patch.restore()
    assert actor.PolicyLoss is theirs.PolicyLoss


def test_use_alignops_checks_its_arguments_before_patching():
    actor = types.ModuleType("ppo_actor")
    actor.PolicyLoss = object
    with pytest.raises(ValueError, match="unknown method"):
        ao_orl.use_alignops("no_such_method", modules=[actor])
    with pytest.raises(TypeError, match="gppo_beta1"):
        ao_orl.use_alignops("cispo", modules=[actor], gppo_beta1=0.5)
    with pytest.raises(TypeError, match="modules"):
        ao_orl.use_alignops(modules="openrlhf.models")
    assert actor.PolicyLoss is object


def test_use_alignops_default_modules_are_openrlhfs(monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "openrlhf.models.loss", None)      # an openrlhf that cannot be imported
        with pytest.raises(ImportError, match="modules="):
            ao_orl.use_alignops()
    if not all(importlib.util.find_spec(name) for name in ("deepspeed", "flash_attn", "ray")):
        return                                                    # OpenRLHF's package cannot be imported here
    import openrlhf.models
    import openrlhf.models.actor
    with ao_orl.use_alignops():
        assert openrlhf.models.PolicyLoss is ao_orl.PolicyLoss
        assert openrlhf.models.loss.PolicyLoss is ao_orl.PolicyLoss
        assert openrlhf.models.actor.log_probs_from_logits is ao_orl.log_probs_from_logits
    assert openrlhf.models.PolicyLoss is not ao_orl.PolicyLoss


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(clip_eps_low=0.0), ValueError, "clip_eps_low"),
    (dict(clip_eps_low=1.5), ValueError, "clip_eps_low"),
    (dict(clip_eps_high=-0.1), ValueError, "clip_eps_high"),
    (dict(clip_eps_high="0.2"), TypeError, "clip_eps_high"),
    (dict(dual_clip=1.0), ValueError, "dual_clip"),
    (dict(token_level_loss=1), TypeError, "token_level_loss"),
    (dict(policy_loss_type="grpo"), ValueError, "policy_loss_type"),
    (dict(is_correction_level="sequence"), ValueError, "is_correction_level"),
    (dict(is_correction_mode="drop"), ValueError, "is_correction_mode"),
    (dict(is_correction_gating="kl"), ValueError, "is_correction_gating"),
    (dict(is_correction_level="seq", is_correction_mode="clip"), ValueError, "is_correction_mode"),
    (dict(is_correction_level="token", is_correction_mode="clip", is_correction_gating="tv"), ValueError,
     "is_correction_mode"),
    (dict(is_correction_level="token", is_correction_gating="binary_kl"), ValueError, "upper bound"),
    (dict(is_correction_threshold=(5.0, 0.5)), ValueError, "is_correction_threshold"),
    (dict(is_correction_threshold=(0.5,)), ValueError, "is_correction_threshold"),
    (dict(is_correction_threshold="05"), ValueError, "is_correction_threshold"),
    (dict(alignops_method="no_such_method"), ValueError, "unknown method"),
    (dict(alignops_method="cispo", policy_loss_type="gspo"), ValueError, "not both"),
    (dict(sapo_tau_pos=0.5), TypeError, "alignops_method"),
    (dict(alignops_method="cispo", sapo_tau_pos=0.5), TypeError, "sapo_tau_pos"),
    (dict(alignops_method="sapo", sapo_tau_pos=-1.0), ValueError, "sapo_tau_pos"),
])
def test_policy_loss_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ao_orl.PolicyLoss(**kwargs)


def test_forward_rejects_bad_input():
    x = policy_inputs(torch.float32, 0)
    loss_fn = ao_orl.PolicyLoss()
    cases = [
        (dict(log_probs=x["log_probs"][0]), ValueError, "log_probs"),
        (dict(log_probs=x["action_mask"]), TypeError, "log_probs"),
        (dict(old_log_probs=x["old_log_probs"][:, :3]), ValueError, "old_log_probs"),
        (dict(old_log_probs=None), ValueError, "old_log_probs"),
        (dict(rollout_log_probs=x["old_log_probs"].T), ValueError, "rollout_log_probs"),
        (dict(advantages=x["advantages"][:, 1:]), ValueError, "advantages"),
        (dict(action_mask=x["action_mask"][1:]), ValueError, "action_mask"),
        (dict(dp_size=0), ValueError, "dp_size"),
        (dict(dp_size=2.0), ValueError, "dp_size"),
        (dict(batch_num_tokens=-1.0), ValueError, "batch_num_tokens"),
        (dict(batch_num_tokens=torch.ones(2)), ValueError, "batch_num_tokens"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            loss_fn(**{**x, **change})
    with pytest.raises(ValueError, match="global_batch_size"):
        ao_orl.PolicyLoss(token_level_loss=False)(**x, global_batch_size="9")
    with pytest.raises(ValueError, match="rollout_log_probs is required"):
        ao_orl.PolicyLoss(is_correction_level="token")(**{**x, "rollout_log_probs": None})
    with pytest.raises(ValueError, match="rollout_log_probs is required"):
        ao_orl.PolicyLoss(policy_loss_type="gspo", is_correction_level="seq")(**{**x, "rollout_log_probs": None})


def test_other_losses_reject_bad_arguments():
    with pytest.raises(ValueError, match="clip_eps"):
        ao_orl.ValueLoss(clip_eps=0.0)
    with pytest.raises(TypeError, match="token_level_loss"):
        ao_orl.SFTLoss(token_level_loss="yes")
    with pytest.raises(ValueError, match="beta"):
        ao_orl.DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        ao_orl.DPOLoss(beta=0.1, label_smoothing=0.7)
    with pytest.raises(ValueError, match="label_smoothing"):
        ao_orl.DPOLoss(beta=0.1, label_smoothing=0.1, ipo=True)
    with pytest.raises(NotImplementedError, match="ring_attn_group"):
        ao_orl.GPTLMLoss(ring_attn_group=object())
    with pytest.raises(ValueError, match="labels"):
        ao_orl.GPTLMLoss()(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="values"):
        ao_orl.ValueLoss()(torch.zeros(4), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="loss_mask"):
        ao_orl.aggregate_loss(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))
