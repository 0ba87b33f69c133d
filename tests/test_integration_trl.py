"""alignops.integrations.trl against TRL 1.16 itself: its chunked lm_head function, and the real GRPOTrainer run
stock and with alignops from the same seed (CPU, offline, a tiny Qwen2 built from a config)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.conftest import require_framework  # noqa: E402

trl = require_framework("trl", "trl")

import trl.trainer.utils as trl_utils  # noqa: E402
from trl.kernels import ChunkedLogProbFunction as TRLChunkedLogProb  # noqa: E402

from alignops.integrations import trl as ao_trl  # noqa: E402
from tests.trl_distributed_driver import PROMPTS, build_tiny_model  # noqa: E402

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


# --------------------------------------------------------------------------------------------
# the chunked lm_head function


def _head_inputs(n, h, v, *, bias, seed, peaked=False, tie=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    if tie:
        weight[7] = weight[3]          # two vocabulary rows with equal logits: is_top1 needs the first argmax
    if peaked:
        weight[5] *= 12.0
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if tie:
        targets[:4] = 7
        targets[4:8] = 3
    return hidden, weight, b, targets


def _run(fn, hidden, weight, bias, targets, temperature, softcap, scale, outputs, g_logp, g_ent):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    res = fn.apply(h, w, b, targets, temperature, 64, softcap, scale, outputs)
    loss = (res[0] * g_logp).sum()
    if res[1] is not None:
        loss = loss + (res[1] * g_ent).sum()
    loss.backward()
    return res, (h.grad, w.grad, None if b is None else b.grad)


@pytest.mark.parametrize("bias,temperature,softcap,scale,outputs", [
    (True, 0.7, 30.0, 1.0, ALL_OUTPUTS),
    (False, 1.0, None, 0.25, ("log_probs", "entropy")),
    (True, 1.3, 5.0, 0.5, ("log_probs",)),
    (True, 1.0, None, 1.0, ("log_probs", "is_top1", "mean_logits")),
])
def test_chunked_function_matches_trl(bias, temperature, softcap, scale, outputs):
    hidden, weight, b, targets = _head_inputs(37, 16, 203, bias=bias, seed=1)
    g = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    ours = ao_trl.AlignopsChunkedLogProb(chunk_size=8)
    got, got_grads = _run(ours, hidden, weight, b, targets, temperature, softcap, scale, outputs, g_logp, g_ent)
    want, want_grads = _run(TRLChunkedLogProb, hidden, weight, b, targets, temperature, softcap, scale, outputs,
                            g_logp, g_ent)
    for name, x, y in zip(ALL_OUTPUTS, got, want):
        assert (x is None) == (y is None), name
        if y is None:
            continue
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if y.dtype == torch.bool:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5, msg=name)
        if name not in ("log_probs", "entropy"):
            assert not x.requires_grad, name
    for name, x, y in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert (x is None) == (y is None), name
        if y is not None:
            assert y.abs().max() > 1e-3, name
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5, msg=name)


def test_chunked_function_ties_and_peaked_rows():
    hidden, weight, b, targets = _head_inputs(24, 8, 50, bias=False, seed=3, peaked=True, tie=True)
    hidden[:8] = hidden[:8].abs() * weight[3].sign()   # rows whose argmax is the tied pair
    got = ao_trl.AlignopsChunkedLogProb().apply(hidden, weight, None, targets, 0.9, 16, None, 1.0, ALL_OUTPUTS)
    want = TRLChunkedLogProb.apply(hidden, weight, None, targets, 0.9, 16, None, 1.0, ALL_OUTPUTS)
    assert torch.equal(got[4], want[4])
    assert want[4].any() and not want[4].all()
    for x, y in zip(got[:4], want[:4]):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)


def test_only_logp_asked_gives_no_entropy_gradient_path():
    hidden, weight, b, targets = _head_inputs(10, 8, 30, bias=True, seed=4)
    h = hidden.clone().requires_grad_()
    res = ao_trl.AlignopsChunkedLogProb().apply(h, weight, b, targets, 1.0, 32, None, 1.0, ("log_probs",))
    assert res[1:] == (None, None, None, None)
    res[0].sum().backward()
    h_trl = hidden.clone().requires_grad_()
    want = TRLChunkedLogProb.apply(h_trl, weight, b, targets, 1.0, 32, None, 1.0, ("log_probs",))
    want[0].sum().backward()
    torch.testing.assert_close(res[0], want[0], rtol=2e-5, atol=2e-5)
    # the gradient of the log-probs alone, as TRL's own function gives it
    assert h.grad is not None and h_trl.grad.abs().max() > 1e-3
    torch.testing.assert_close(h.grad, h_trl.grad, rtol=2e-5, atol=2e-5)


def test_use_alignops_installs_and_restores():
    own = trl_utils._ChunkedLogProbFunction
    assert own is TRLChunkedLogProb
    patch = ao_trl.use_alignops(chunk_size=16)
    try:
        assert isinstance(trl_utils._ChunkedLogProbFunction, ao_trl.AlignopsChunkedLogProb)
        assert ao_trl.trl_chunked_function() is patch.function and patch.active
    finally:
        patch.restore()
    assert trl_utils._ChunkedLogProbFunction is own and not patch.active
    patch.restore()                      # a second restore is a no-op
    with ao_trl.use_alignops() as outer:
        with ao_trl.use_alignops() as inner:
            assert trl_utils._ChunkedLogProbFunction is inner.function
            with pytest.raises(RuntimeError, match="out of order"):
                outer.restore()
        assert trl_utils._ChunkedLogProbFunction is outer.function
    assert trl_utils._ChunkedLogProbFunction is own


def test_chunked_function_bad_arguments():
    hidden, weight, b, targets = _head_inputs(4, 8, 30, bias=False, seed=5)
    fn = ao_trl.AlignopsChunkedLogProb()
    with pytest.raises(ValueError, match="outputs"):
        fn.apply(hidden, weight, None, targets, 1.0, 32, None, 1.0, ("log_probs", "logits"))
    with pytest.raises(TypeError, match="outputs"):
        fn.apply(hidden, weight, None, targets, 1.0, 32, None, 1.0, "entropy")
    with pytest.raises(ValueError, match="chunk_size"):
        fn.apply(hidden, weight, None, targets, 1.0, 0, None, 1.0, ("log_probs",))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fn.apply(hidden, weight, None, targets, 1.0, 32, -1.0, 1.0, ("log_probs",))
    with pytest.raises(ValueError, match="temperature"):
        fn.apply(hidden, weight, None, targets, 0.0, 32, None, 1.0, ("log_probs",))
    with pytest.raises(ValueError, match="hidden"):
        fn.apply(hidden[None], weight, None, targets, 1.0, 32, None, 1.0, ("log_probs",))
    with pytest.raises(ValueError, match="chunk_size"):
        ao_trl.use_alignops(chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        ao_trl.use_alignops(backend="tpu")


# --------------------------------------------------------------------------------------------
# the real GRPOTrainer, stock and with alignops




def _reward(completions, prompts=None, **_):
    # "zz9" always earns the same: its group has equal rewards, so zero advantages
    return [1.0 if p == "zz9" else float(sum(map(ord, c)) % 7) + 0.25 * len(c) for c, p in zip(completions, prompts)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The trainer runs are tiny matmuls: on a shared 2-core machine a second intra-op thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A saved 2-layer Qwen2 (hidden 32, vocab 42) and its character-level tokenizer."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    return str(path), build_tiny_model(str(path))


def _callback():
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.logs, self.params = [], []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

        def on_step_end(self, args, state, control, model=None, **kw):
            self.params.append({k: v.detach().clone() for k, v in model.named_parameters()})

    return Record()


def _train(tiny_model, tmp_path, trainer_cls=None, config_cls=None, **overrides):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    path, tok = tiny_model
    trainer_cls = trainer_cls or GRPOTrainer
    config_cls = config_cls or GRPOConfig
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=8, max_steps=3, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                    learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", save_strategy="no",
                    loss_type="dapo", beta=0.0, bf16=False)
    settings.update(overrides)
    record = _callback()
    trainer = trainer_cls(model=path, reward_funcs=_reward, args=config_cls(**settings),
                          train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 2}), processing_class=tok,
                          callbacks=[record])
    trainer.train()
    assert len(record.logs) == settings["max_steps"] and len(record.params) == settings["max_steps"]
    return record


def _assert_same_run(got, want, initial=None, rtol=1e-5, atol=1e-6, keys=("loss", "grad_norm")):
    for step, (g, w) in enumerate(zip(got.logs, want.logs)):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=atol), (step, key, g[key], w[key])
    assert any(w["grad_norm"] > 1e-3 for w in want.logs)
    for step, (g, w) in enumerate(zip(got.params, want.params)):
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=rtol, atol=atol, msg=f"step {step} {name}")
    moved = max((want.params[-1][n] - want.params[0][n]).abs().max().item() for n in want.params[0])
    assert moved > 100 * atol, "the parameters barely moved: the comparison would prove nothing"


class _CountingFunction(ao_trl.AlignopsChunkedLogProb):
    def __init__(self):
        super().__init__()
        self.calls = []

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, *rest):
        self.calls.append((hidden.shape[0], rest[-1] if rest else None, temperature))
        return super().apply(hidden, weight, bias, targets, temperature, chunk_size, *rest)


LOSS_CASES = {
    "dapo": dict(loss_type="dapo"),
    "grpo-beta-2iter-T0.8": dict(loss_type="grpo", beta=0.04, num_iterations=2, temperature=0.8, learning_rate=2.0),
    "bnpo-ga2-masked-plain-kl": dict(loss_type="bnpo", gradient_accumulation_steps=2, mask_truncated_completions=True,
                                     beta=0.1, use_bias_correction_kl=False),
    "dr_grpo-2iter-entropy": dict(loss_type="dr_grpo", num_iterations=2, entropy_coef=0.05, learning_rate=2.0),
    "cispo-2iter": dict(loss_type="cispo", epsilon_high=1.05, num_iterations=2, learning_rate=2.0),
    "sapo-2iter": dict(loss_type="sapo", num_iterations=2, learning_rate=2.0, sapo_temperature_pos=0.7),
    "luspo-sequence-beta": dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2,
                                beta=0.02, learning_rate=2.0),
    "gspo-ga2-2iter": dict(loss_type="grpo", importance_sampling_level="sequence", gradient_accumulation_steps=2,
                           num_iterations=2, learning_rate=2.0, epsilon=3e-4, epsilon_high=4e-4),
    "dapo-ga2-entropy-beta": dict(loss_type="dapo", gradient_accumulation_steps=2, entropy_coef=0.05, beta=0.05,
                                  use_bias_correction_kl=False),
    "vespo-2iter": dict(loss_type="vespo", num_iterations=2, learning_rate=2.0),
    "vespo-ga2-2iter-beta-params": dict(loss_type="vespo", gradient_accumulation_steps=2, num_iterations=2, beta=0.04,
                                        learning_rate=2.0, vespo_k_pos=1.0, vespo_lambda_pos=1.5, vespo_k_neg=0.5,
                                        vespo_lambda_neg=4.0),
}


_STOCK_RUNS = {}


def _stock_run(tiny_model, tmp_path, case):
    """Stock GRPOTrainer's run of LOSS_CASES[case], computed once per module (TRL on CPU is bit-deterministic)."""
    if case not in _STOCK_RUNS:
        _STOCK_RUNS[case] = _train(tiny_model, tmp_path / "stock", **LOSS_CASES[case])
    return _STOCK_RUNS[case]


@pytest.mark.parametrize("case", ["dapo", "grpo-beta-2iter-T0.8", "bnpo-ga2-masked-plain-kl"])
def test_use_alignops_gives_stock_trl_run(tiny_model, tmp_path, case):
    overrides = LOSS_CASES[case]
    want = _stock_run(tiny_model, tmp_path, case)
    counting = _CountingFunction()
    with ao_trl.AlignopsPatch(counting).install():
        got = _train(tiny_model, tmp_path / "alignops", **overrides)
    assert trl_utils._ChunkedLogProbFunction is TRLChunkedLogProb
    _assert_same_run(got, want)
    outputs = {c[1] for c in counting.calls}
    assert ("log_probs", "entropy") in outputs
    assert (("log_probs",) in outputs) == (overrides.get("beta", 0.0) != 0.0)
    assert {c[2] for c in counting.calls} == {overrides.get("temperature", 1.0)}
    if overrides.get("num_iterations", 1) > 1:
        assert any(w["clip_ratio/region_mean"] > 0 for w in want.logs), "the second iteration never clipped"


# --------------------------------------------------------------------------------------------
# AlignopsGRPOTrainer: the policy loss from the hidden states, against stock GRPOTrainer


# every metric stock _compute_loss logs
LOSS_METRICS = ("kl", "entropy", "vespo/phi_seq_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "policy_loss", "entropy_coef")


def _assert_same_metrics(got, want):
    for step, (g, w) in enumerate(zip(got.logs, want.logs)):
        assert {k for k in LOSS_METRICS if k in g} == {k for k in LOSS_METRICS if k in w}, step
        for key in LOSS_METRICS:
            if key in w and w[key] is None:        # TRL logs None where every value was NaN (all rows empty)
                assert g[key] is None, (step, key)
            elif key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (step, key, g[key], w[key])


@pytest.fixture
def compact_rows(monkeypatch):
    """TRL's Triton-device layout on CPU: the lm_head function gets only the labelled rows."""
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)




@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_alignops_trainer_gives_stock_trl_run(tiny_model, tmp_path, case):
    overrides = LOSS_CASES[case]
    want = _stock_run(tiny_model, tmp_path, case)
    got = _train(tiny_model, tmp_path / "alignops", trainer_cls=ao_trl.AlignopsGRPOTrainer,
                 config_cls=ao_trl.AlignopsGRPOConfig, **overrides)
    assert trl_utils._ChunkedLogProbFunction is TRLChunkedLogProb
    _assert_same_run(got, want)
    _assert_same_metrics(got, want)
    if overrides.get("num_iterations", 1) > 1 and overrides["loss_type"] in ("grpo", "dr_grpo", "luspo"):
        assert any(w["clip_ratio/region_mean"] > 0 for w in want.logs), "the second iteration never clipped"
    if overrides["loss_type"] == "cispo":
        assert any(w["cispo_clip_ratio"] > 0 for w in want.logs), "the ratio cap never bit"
    if overrides["loss_type"] == "vespo":
        assert any(abs(w["vespo/phi_seq_mean"] - 1.0) > 1e-3 for w in want.logs), "the gate never left g(1) = 1"


@pytest.mark.parametrize("case", ["grpo-beta-2iter-T0.8", "dapo-ga2-entropy-beta"])
def test_alignops_trainer_on_labelled_rows_only(tiny_model, tmp_path, compact_rows, case):
    overrides = LOSS_CASES[case]
    want = _train(tiny_model, tmp_path / "stock", **overrides)
    got = _train(tiny_model, tmp_path / "alignops", trainer_cls=ao_trl.AlignopsGRPOTrainer,
                 config_cls=ao_trl.AlignopsGRPOConfig, **overrides)
    _assert_same_run(got, want)
    _assert_same_metrics(got, want)


@pytest.mark.parametrize("overrides,match", [
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(delta=1.5), "delta"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(loss_type="cispo"), "epsilon_high"),
    (dict(loss_type="grpo", entropy_coef=0.01), "entropy_coef"),
    (dict(loss_type="sapo", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_alignops_trainer_refuses_what_it_cannot_reproduce(tiny_model, tmp_path, overrides, match):
    with pytest.raises(NotImplementedError, match=match):
        _train(tiny_model, tmp_path, trainer_cls=ao_trl.AlignopsGRPOTrainer, config_cls=ao_trl.AlignopsGRPOConfig,
               **overrides)


def test_vespo_with_vllm_importance_correction_is_refused():
    """TRL folds vLLM's importance ratio into VESPO's sequence weight, where alignops would multiply the loss by it
    (no vLLM here: the config is judged as the trainer judges it at construction)."""
    kw = dict(output_dir="unused", loss_type="vespo", use_vllm=True, report_to=[], use_cpu=True, bf16=False)
    why = ao_trl._unsupported(ao_trl.AlignopsGRPOConfig(**kw), "vespo")
    assert why is not None and "vllm_importance_sampling_correction" in why
    off = ao_trl.AlignopsGRPOConfig(**kw, vllm_importance_sampling_correction=False)
    assert ao_trl._unsupported(off, "vespo") is None


# --------------------------------------------------------------------------------------------
# vLLM's importance-sampling correction: AlignopsGRPOTrainer through the rollout_logp route


def _trl_is_weights(old, rollout, mask, mode, clip_min, clip_max):
    """TRL 1.16's vLLM importance-sampling ratio written out in float64 (its formula, not its code): per token, or
    per sequence (the product), truncated to [clip_min, clip_max] or zeroed outside it; a NaN rollout log-prob
    counts as no difference. Returned per token ([B, T]), 0 outside the mask."""
    old, rollout, m = old.double(), rollout.double(), mask.double()
    diff = torch.nan_to_num((old - rollout) * m, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True).expand_as(old)
    ratio = torch.exp(diff)
    low = -float("inf") if clip_min is None else clip_min
    high = float("inf") if clip_max is None else clip_max
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=low, max=high)
    else:
        ratio = torch.where((ratio < low) | (ratio > high), 0.0, ratio)
    return ratio * m


@pytest.mark.parametrize("mode", sorted(ao_trl.TRL_IS_MODES))
@pytest.mark.parametrize("clips", [(None, 3.0), (0.5, 2.0), (None, None)], ids=["defaults", "both", "none"])
def test_trl_rollout_correction_gives_trls_weights(mode, clips):
    import alignops as ao

    if mode.endswith("truncate") and clips == (None, None):
        with pytest.raises(ValueError, match="vllm_importance_sampling_clip_max"):
            ao_trl.trl_rollout_correction(mode, *clips)
        return
    g = torch.Generator().manual_seed(11)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g) * 3
    rollout = old + 0.8 * torch.randn(B, T, generator=g)
    rollout[1, 2] = float("nan")                 # a token vLLM could not score
    if clips[1] is not None:
        rollout[4] = old[4] - 60.0               # a product of ratios beyond fp32's range (inf), then capped
    rollout[5] = old[5] + 3.0                    # a product of ratios e^-27: TRL clamps no exponent (verl at -20)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 5:] = False
    mask[3, 1:] = False
    want = _trl_is_weights(old, rollout, mask, mode, *clips)
    if clips != (None, None):
        unbounded = _trl_is_weights(old, rollout, mask, mode.split("_")[0] + "_mask", None, None)
        assert (want > 0).any() and not torch.equal(want, unbounded)   # the bounds bite, and not on every token
    spec = ao_trl.trl_rollout_correction(mode, *clips)
    clean = torch.where(torch.isnan(rollout), old, rollout)     # what the trainer passes for vLLM's NaN
    got = ao.rollout_correction(old, clean, mask, **spec).rollout_is_weights
    torch.testing.assert_close(got.double() * mask, want, rtol=1e-6, atol=0)
    # the route inside a loss takes the same weights
    logp = (old + 0.1).requires_grad_()
    adv = torch.linspace(-1, 1, B)
    routed = ao.policy_loss(logp, old, adv, mask, method="ppo", rollout_logp=clean, rollout_correction=spec)
    given = ao.policy_loss(logp, old, adv, mask, method="ppo", rollout_is_weights=want.float())
    torch.testing.assert_close(routed.loss, given.loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="token"), "vllm_importance_sampling_mode"),
    (dict(clip_min=-0.5), "vllm_importance_sampling_clip_min"),
    (dict(clip_max=0.0), "vllm_importance_sampling_clip_max"),
    (dict(clip_min=2.0, clip_max=1.5), "must not exceed"),
    (dict(mode="token_truncate", clip_max=None), "vllm_importance_sampling_clip_min or"),
])
def test_trl_rollout_correction_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ao_trl.trl_rollout_correction(**kwargs)


ROLLOUT_NOISE = 0.7


def _with_rollout_logps(trainer_cls):
    """trainer_cls with TRL's vLLM branches on, its completions still sampled by transformers' generate (no vLLM
    here), and a stand-in for vLLM's per-token log-probs: the model's own log-probs of the sampled tokens at the
    sampling temperature plus seeded noise (the mismatch), the last token of the first completion far less likely,
    one token of the second completion unscorable (vLLM's None). Both trainers of a comparison get these same
    inputs and compute the correction from them."""

    class WithRolloutLogps(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_vllm = True
            self._rollout_draws = 0

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            self.use_vllm = False
            try:
                completion_ids, _ = super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                                  num_generations, has_tool_images)
            finally:
                self.use_vllm = True
            g = torch.Generator().manual_seed(1000 + self._rollout_draws)
            self._rollout_draws += 1
            logprobs = []
            with torch.no_grad():
                for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
                    logits = self.model(input_ids=torch.tensor([list(p) + list(c)])).logits[0, len(p) - 1:-1]
                    lp = torch.log_softmax(logits.float() / self.temperature, -1)[torch.arange(len(c)), c]
                    lp = (lp + ROLLOUT_NOISE * torch.randn(len(c), generator=g)).tolist()
                    if row == 0:
                        lp[-1] -= 2.0        # a token vLLM found far less likely: ratio ~e^2, beyond TRL's cap 3
                    if row == 1:
                        lp[0] = None
                    logprobs.append(lp)
            return completion_ids, logprobs

    return WithRolloutLogps


IS_CASES = {
    "token_truncate": dict(loss_type="dapo", vllm_importance_sampling_mode="token_truncate"),
    "token_mask-grpo-beta": dict(loss_type="grpo", beta=0.04, vllm_importance_sampling_mode="token_mask"),
    "sequence_truncate-bnpo-ga2": dict(loss_type="bnpo", gradient_accumulation_steps=2,
                                       vllm_importance_sampling_mode="sequence_truncate"),
    "sequence_mask-2iter": dict(loss_type="dapo", num_iterations=2, learning_rate=2.0),   # TRL's default mode
}
# TRL's generation-time metrics of the correction
SAMPLING_METRICS = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                    "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                    "sampling/importance_sampling_ratio/max")
_STOCK_IS_RUNS = {}


def _stock_is_run(tiny_model, tmp_path, case):
    from trl import GRPOTrainer

    if case not in _STOCK_IS_RUNS:
        _STOCK_IS_RUNS[case] = _train(tiny_model, tmp_path / "stock", trainer_cls=_with_rollout_logps(GRPOTrainer),
                                      **IS_CASES[case])
    return _STOCK_IS_RUNS[case]


@pytest.mark.parametrize("case", sorted(IS_CASES))
def test_alignops_trainer_vllm_correction_gives_stock_trl_run(tiny_model, tmp_path, case):
    overrides = IS_CASES[case]
    mode = overrides.get("vllm_importance_sampling_mode", "sequence_mask")
    want = _stock_is_run(tiny_model, tmp_path, case)
    got = _train(tiny_model, tmp_path / "alignops", trainer_cls=_with_rollout_logps(ao_trl.AlignopsGRPOTrainer),
                 config_cls=ao_trl.AlignopsGRPOConfig, **overrides)
    _assert_same_run(got, want)
    _assert_same_metrics(got, want)
    stats = [w for w in want.logs if "sampling/importance_sampling_ratio/mean" in w]
    assert len(stats) == 3 // overrides.get("num_iterations", 1) + (overrides.get("num_iterations", 1) > 1)
    # the correction bit: a ratio capped (truncate) or zeroed (mask), and a vLLM NaN token in every batch
    if mode.endswith("truncate"):
        assert any(w["sampling/importance_sampling_ratio/max"] == 3.0 for w in stats)
    else:
        assert any(w["sampling/importance_sampling_ratio/min"] == 0.0 for w in stats)
    assert all(0.0 < w["sampling/importance_sampling_ratio/mean"] for w in stats)
    # TRL's generation step runs in both (on old log-probs scored by alignops's head in one of them)
    for g, w in zip(got.logs, want.logs):
        assert {k for k in SAMPLING_METRICS if k in g} == {k for k in SAMPLING_METRICS if k in w}
        for key in SAMPLING_METRICS:
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (key, g[key], w[key])
    # alignops's own metrics of the correction, per micro-batch: TRL's where a micro-batch is the generation batch
    names = ("rollout_is_min", "rollout_is_mean", "rollout_is_max") if mode.startswith("token") else \
        ("rollout_is_seq_min", "rollout_is_seq_mean", "rollout_is_seq_max")
    assert all(f"rollout_corr/{n}" in g for g in got.logs for n in names)
    if overrides.get("gradient_accumulation_steps", 1) == 1:
        for g, w in zip(got.logs, want.logs):
            for name, trl_name in zip(names, ("min", "mean", "max")):
                if f"sampling/importance_sampling_ratio/{trl_name}" in w:
                    assert g[f"rollout_corr/{name}"] == pytest.approx(
                        w[f"sampling/importance_sampling_ratio/{trl_name}"], rel=1e-5, abs=1e-6), name


def test_alignops_trainer_vllm_correction_on_labelled_rows_only(tiny_model, tmp_path, compact_rows):
    from trl import GRPOTrainer

    overrides = IS_CASES["sequence_mask-2iter"]
    want = _train(tiny_model, tmp_path / "stock", trainer_cls=_with_rollout_logps(GRPOTrainer), **overrides)
    got = _train(tiny_model, tmp_path / "alignops", trainer_cls=_with_rollout_logps(ao_trl.AlignopsGRPOTrainer),
                 config_cls=ao_trl.AlignopsGRPOConfig, **overrides)
    _assert_same_run(got, want)
    _assert_same_metrics(got, want)


def test_use_alignops_vllm_correction_gives_stock_trl_run(tiny_model, tmp_path):
    """Under use_alignops TRL computes its own correction; only the old log-probs it starts from are alignops's."""
    from trl import GRPOTrainer

    want = _stock_is_run(tiny_model, tmp_path, "token_truncate")
    with ao_trl.use_alignops():
        got = _train(tiny_model, tmp_path / "alignops", trainer_cls=_with_rollout_logps(GRPOTrainer),
                     **IS_CASES["token_truncate"])
    _assert_same_run(got, want)
    for g, w in zip(got.logs, want.logs):
        for key in SAMPLING_METRICS:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (key, g[key], w[key])


def test_vespo_with_vllm_correction_is_refused_at_the_loss(tiny_model, tmp_path):
    """The same refusal when the vLLM branches are switched on after the trainer was built."""
    with pytest.raises(NotImplementedError, match="vespo.*sequence log-weight"):
        _train(tiny_model, tmp_path, trainer_cls=_with_rollout_logps(ao_trl.AlignopsGRPOTrainer),
               config_cls=ao_trl.AlignopsGRPOConfig, loss_type="vespo")


# --------------------------------------------------------------------------------------------
# alignops_method: the methods only alignops has, inside TRL's normalisation


def _reference_method_trainer(method, method_kwargs):
    """GRPOTrainer whose loss is the method's float64 formula (tests/policy_oracle.py, which shares no code with
    alignops) on TRL's own per-token log-probs (TRL's chunked lm_head), with TRL's normaliser written out here for
    dapo and grpo and TRL's k3 KL term (beta) where the case has one."""
    from trl import GRPOTrainer

    from tests import policy_oracle

    class Reference(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            completion_ids = inputs["completion_ids"]
            input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            logp, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                                 completion_ids.size(1), compute_entropy=True)
            mask = inputs["completion_mask"]
            ga = self.current_gradient_accumulation_steps
            if self.loss_type == "dapo":
                agg = "token-mean"
                norm = float(inputs["num_items_in_batch"].clamp(min=1.0)) * ga / self.args.steps_per_generation
            else:
                assert self.loss_type == "grpo"
                agg, norm = "seq-mean-token-mean", float(mask.shape[0] * ga)
            kl = {} if self.beta == 0 else dict(ref_logp=inputs["ref_per_token_logps"], kl_coef=self.beta,
                                                 kl_estimator="k3")
            loss = policy_oracle.policy_loss_graph(logp, inputs.get("old_per_token_logps"), inputs["advantages"],
                                                   mask, method=method, agg=agg, normalizer=norm, **kl,
                                                   **method_kwargs)
            return loss.to(logp.dtype)

    return Reference


METHOD_CASES = {
    "gppo": ("gppo", {"gppo_beta1": 0.5, "gppo_beta2": 0.75}, dict(loss_type="dapo")),
    "ecpo-beta": ("ecpo", {"ecpo_delta": 0.05}, dict(loss_type="dapo", beta=0.05, use_bias_correction_kl=False)),
    "gspo-token": ("gspo-token", {"clip_low": 2e-3, "clip_high": 3e-3}, dict(loss_type="grpo")),
    "bapo-ga2": ("bapo", {}, dict(loss_type="dapo", gradient_accumulation_steps=2)),
}


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_alignops_method_in_trl_normalisation(tiny_model, tmp_path, case):
    method, method_kwargs, overrides = METHOD_CASES[case]
    overrides = dict(overrides, num_iterations=2, learning_rate=2.0)
    want = _train(tiny_model, tmp_path / "reference", trainer_cls=_reference_method_trainer(method, method_kwargs),
                  **overrides)
    got = _train(tiny_model, tmp_path / "alignops", trainer_cls=ao_trl.AlignopsGRPOTrainer,
                 config_cls=ao_trl.AlignopsGRPOConfig, alignops_method=method, alignops_method_kwargs=method_kwargs,
                 **overrides)
    _assert_same_run(got, want)
    stock = _train(tiny_model, tmp_path / "stock", **overrides)
    assert any(abs(g["grad_norm"] - s["grad_norm"]) > 1e-4 for g, s in zip(got.logs, stock.logs)), \
        "the alignops method trained exactly like TRL's own loss: the option did nothing"
    assert all("clip_ratio/region_mean" in g and "entropy" in g for g in got.logs)
    if method == "bapo":
        assert all("alignops/bapo/clip_low" in g for g in got.logs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(alignops_method="nope"), ValueError, "unknown method 'nope'"),
    (dict(alignops_method="gppo", alignops_method_kwargs={"agg": "token-mean"}), ValueError, "'agg'"),
    (dict(alignops_method_kwargs={"gppo_beta1": 0.5}), ValueError, "needs alignops_method"),
    (dict(alignops_method="gppo", alignops_method_kwargs={"ecpo_delta": 0.1}), TypeError, "ecpo_delta"),
    (dict(alignops_method="gppo", alignops_method_kwargs='{"gppo_beta1": -1}'), ValueError, "gppo_beta1"),
    (dict(alignops_method="gppo", importance_sampling_level="sequence"), NotImplementedError, "ratio level"),
])
def test_alignops_method_bad_options(tiny_model, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        _train(tiny_model, tmp_path, trainer_cls=ao_trl.AlignopsGRPOTrainer, config_cls=ao_trl.AlignopsGRPOConfig,
               **kwargs)


def test_chunked_function_under_autocast():
    """TRL's default GRPOConfig(bf16=True) runs the head under autocast. Both cast the GEMM's operands to
    bf16; TRL's chunked function then rounds its logits tile to bf16, alignops keeps the fp32 accumulator.
    Held to float64 on the same bf16-rounded operands, alignops is the more precise (~1e-6 against TRL's
    ~1e-2), in value and gradient; without autocast (fp32) the two agree to fp32 rounding."""
    hidden, weight, b, targets = _head_inputs(64, 32, 300, bias=False, seed=6)
    outputs = ("log_probs", "entropy")
    h16, w16 = hidden.bfloat16().double(), weight.bfloat16().double()
    z = (h16 @ w16.T).requires_grad_()
    lsm = torch.log_softmax(z, -1)
    want_lp, want_ent = lsm.gather(-1, targets[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)
    upstream = torch.linspace(-1, 1, 64, dtype=torch.float64)
    (upstream * want_lp + 0.5 * upstream.flip(0) * want_ent).sum().backward()
    want_dh = z.grad @ w16

    errors = {}
    for name, fn in (("alignops", ao_trl.AlignopsChunkedLogProb().apply), ("trl", TRLChunkedLogProb.apply)):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = fn(h, weight, None, targets, 1.0, 128, None, 1.0, outputs)[:2]
        assert lp.dtype == torch.float32
        (upstream.float() * lp + 0.5 * upstream.flip(0).float() * ent).sum().backward()
        errors[name] = [(x.double() - y).abs().max().item()
                        for x, y in ((lp, want_lp), (ent, want_ent), (h.grad, want_dh))]
    assert max(errors["alignops"][:2]) < 2e-5, errors
    assert errors["trl"][0] > 1e-3, errors      # TRL's bf16 tile: the rounding this test is about
    for ours, theirs in zip(errors["alignops"], errors["trl"]):
        assert ours <= theirs, errors

    got = ao_trl.AlignopsChunkedLogProb().apply(hidden, weight, b, targets, 1.0, 128, None, 1.0, outputs)
    want = TRLChunkedLogProb.apply(hidden, weight, b, targets, 1.0, 128, None, 1.0, outputs)
    for x, y in zip(got[:2], want[:2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("scored", ["some", "first_masked", "none"])
def test_trainer_loss_routed_through_model_output(compact, scored):
    """AlignopsGRPOTrainer's loss reaches backward through the log-probs the model returns (the route ZeRO-3
    needs): the precomputed gradients arrive scaled by exactly the loss's incoming gradient, through TRL's two
    ways of placing the rows (every position then masked, or only the labelled ones scattered), a masked first
    position, and a micro-batch with nothing scored (zero: the loss is then constant)."""
    B, C, T = 2, 4, 6
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    if scored == "first_masked":
        mask[:, 0] = 0
    elif scored == "none":
        mask.zero_()
    attention = torch.ones(B, T, dtype=torch.long)
    input_ids = torch.arange(B * T).reshape(B, T) % 7 + 1
    request = ao_trl._LossRequest(input_ids, attention, C, mask, torch.ones(B), None, {}, want_logp=False)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    taken = torch.randn(3, 5, dtype=torch.float64)          # the gradient the loss took in forward
    loss = ao_trl._TakenGradients.apply(torch.tensor(0.75, dtype=torch.float64), torch.zeros(1), weight, None,
                                        None, taken, None)
    request.output = type("Out", (), {"loss": loss})()
    label_mask = torch.zeros(B, T - 1, dtype=torch.bool)
    label_mask[:, -C:] = mask != 0
    n = int(label_mask.sum()) if compact else B * (T - 1)
    rows = request._through_output(torch.randn(n).double())
    # TRL's _fused_forward and _get_per_token_logps_and_entropies on the rows
    if compact:
        grid = rows.new_zeros(B, T - 1).masked_scatter(label_mask, rows)
    else:
        grid = rows.view(B, T - 1).masked_fill(~label_mask, 0)
    logps = grid[:, -C:]
    total = request.loss_from_output(logps)
    assert total.item() == 0.75
    (2.5 * total).backward()
    want = torch.zeros_like(taken) if scored == "none" else 2.5 * taken
    torch.testing.assert_close(weight.grad, want, rtol=0, atol=0)


def test_use_alignops_gives_stock_sft_run(tiny_model, tmp_path):
    """SFTTrainer asks the head for is_top1 (its mean_token_accuracy) besides log-probs and entropy."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    path, tok = tiny_model

    def run(out):
        record = _callback()
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                         report_to="none", use_cpu=True, seed=0, learning_rate=0.5, optim="sgd",
                         lr_scheduler_type="constant", save_strategy="no", bf16=False, max_length=16)
        data = datasets.Dataset.from_dict({"text": [p + " " + p[::-1] + " abc" for p in PROMPTS] * 2})
        SFTTrainer(model=path, args=args, train_dataset=data, processing_class=tok, callbacks=[record]).train()
        return record

    want = run(tmp_path / "stock")
    counting = _CountingFunction()
    with ao_trl.AlignopsPatch(counting).install():
        got = run(tmp_path / "alignops")
    assert {c[1] for c in counting.calls} == {("log_probs", "entropy", "is_top1")}
    _assert_same_run(got, want)
    for g, w in zip(got.logs, want.logs):
        assert g["mean_token_accuracy"] == w["mean_token_accuracy"]
        assert g["entropy"] == pytest.approx(w["entropy"], rel=1e-5)
