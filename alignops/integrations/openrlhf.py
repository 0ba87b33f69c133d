"""alignops inside OpenRLHF 0.11: its losses (`openrlhf/models/loss.py`) with the same constructors, call
signatures and return values, computed by alignops.

    from alignops.integrations.openrlhf import PolicyLoss, use_alignops
    loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, policy_loss_type="ppo",
                         is_correction_level="token", is_correction_mode="clip")
    loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = loss_fn(
        log_probs, old_log_probs, advantages, action_mask=mask, rollout_log_probs=rollout_log_probs,
        dp_size=8, batch_num_tokens=step_tokens, global_batch_size=step_samples)
    PolicyLoss(clip_eps_low=1.0, clip_eps_high=0.2, alignops_method="cispo")   # methods OpenRLHF lacks

    use_alignops()       # OpenRLHF's own trainers now build these losses; .restore() undoes it

OpenRLHF's PPO actor builds `PolicyLoss` in `openrlhf/trainer/ray/ppo_actor.py` from the name it imports
from `openrlhf.models` (and takes `aggregate_loss` from there for the KL and entropy terms); the critic
takes `ValueLoss`, the SFT and DPO trainers `SFTLoss` and `DPOLoss`, all from `openrlhf.models`; its
`Actor` (`openrlhf/models/actor.py`) scores tokens with `log_probs_from_logits` and `compute_entropy` from
`openrlhf.models.utils`. use_alignops replaces those names where they are defined, in `openrlhf.models`,
in the Actor's module and in every consumer already imported, so what is built or called afterwards runs
on alignops (the two logits functions on its fused logits pass). Under Ray each worker is its own
process: run it there with `runtime_env={"worker_process_setup_hook":
"alignops.integrations.openrlhf.use_alignops"}` (docs/integrations/openrlhf.md).

Where OpenRLHF returns NaN (a micro-batch whose action mask is empty, all labels ignored) these return
0, with a zero gradient; losses are fp32 (fp64 for fp64 input) whatever the input dtype. Nothing here
imports openrlhf except use_alignops() without `modules`.
"""

from __future__ import annotations

import importlib
import math
import sys

import torch
from torch import Tensor, nn

import alignops as ao
from alignops import layout
from alignops._validate import check_bool, check_choice, check_float, is_number
from alignops.policy.registry import get_method, resolve_options

POLICY_LOSS_TYPES = ("ppo", "gspo")
IS_CORRECTION_LEVELS = ("off", "token", "seq")
IS_CORRECTION_MODES = ("mask", "clip")
IS_CORRECTION_GATINGS = ("ratio", "binary_kl", "tv")
IGNORE_INDEX = -100
# OpenRLHF clamps the token probabilities of its binary-KL / TV gates to keep the logs finite.
GATE_PROB_CLAMP = 1e-6
# PPO's token log-ratio clamp in OpenRLHF; its GSPO ratio is not clamped at all.
PPO_LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# aggregation


def _check_dp_size(dp_size) -> int:
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be a positive int, got {dp_size!r}")
    return dp_size


def _step_normalizer(count, dp_size: int, name: str, dtype, device):
    """OpenRLHF divides by the step's global count and multiplies by dp_size (DeepSpeed averages the
    gradients over the DP ranks): one normaliser, count / dp_size. A tensor count stays on its device."""
    if count is None:
        return None
    if isinstance(count, Tensor):
        if count.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(count.shape)}")
        return count.reshape(()).to(device=device, dtype=dtype) / dp_size
    if not is_number(count) or not math.isfinite(count) or count < 0:
        raise ValueError(f"{name} must be a finite number >= 0, a scalar tensor or None, got {count!r}")
    return float(count) / dp_size


def _check_tokens(name: str, x) -> Tensor:
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")
    return x


def _agg(token_level_loss: bool) -> str:
    return "token-mean" if token_level_loss else "seq-mean-token-mean"


def aggregate_loss(loss: Tensor, loss_mask: Tensor | None, token_level_loss: bool = True, dp_size: int = 1,
                   batch_num_tokens=None, global_batch_size=None) -> Tensor:
    """OpenRLHF's `aggregate_loss` on alignops's aggregation: a `[B, T]` per-token loss to a scalar,
    masked token mean (`token_level_loss`) or mean over non-empty sequences of their token means, divided
    by the step's global `batch_num_tokens` / `global_batch_size` times `dp_size` when given. Computed in
    fp32 (fp64 for fp64 input); an empty mask gives 0."""
    _check_tokens("loss", loss)
    check_bool("token_level_loss", token_level_loss)
    dp_size = _check_dp_size(dp_size)
    mask = layout.token_mask(loss_mask, loss.shape, loss.device, "loss_mask")
    dtype = layout.compute_dtype(loss.dtype)
    rows = layout.Rows(loss.shape, loss.device)
    agg = _agg(token_level_loss)
    count, name = ((batch_num_tokens, "batch_num_tokens") if token_level_loss
                   else (global_batch_size, "global_batch_size"))
    norm = _step_normalizer(count, dp_size, name, dtype, loss.device)
    if norm is None:
        norm = layout.default_normalizer(agg, mask, rows, None, dtype)
    return layout.aggregate(layout.sanitize(loss, mask, dtype), mask, rows, agg, norm)


# --------------------------------------------------------------------------------------------
# PolicyLoss


def _check_threshold(threshold) -> tuple[float, float]:
    if (isinstance(threshold, (str, bytes)) or not hasattr(threshold, "__len__") or len(threshold) != 2
            or not all(is_number(x) and math.isfinite(x) for x in threshold)):
        raise ValueError(f"is_correction_threshold must be a pair (low, high) of finite numbers, got {threshold!r}")
    low, high = float(threshold[0]), float(threshold[1])
    if low > high:
        raise ValueError(f"is_correction_threshold must have low <= high, got {tuple(threshold)}")
    return low, high


class PolicyLoss(nn.Module):
    """OpenRLHF's `PolicyLoss` (same arguments and defaults) computed by `ao.policy_loss`.

    `policy_loss_type`: "ppo" (alignops method `ppo`, dual clip = `clip_ratio_c`) or "gspo" (alignops `gspo`
    on the unclamped sequence ratio, per-sequence mean as OpenRLHF forces). `token_level_loss` selects the
    aggregation, token-mean or seq-mean-token-mean. The `is_correction_*` options weight (ppo) the
    per-token loss with OpenRLHF's train/rollout importance correction, passed to alignops as
    `rollout_is_weights`; for gspo the ratio is taken against `rollout_log_probs` instead, as in OpenRLHF.

    `alignops_method`: any alignops registry method instead (cispo, sapo, gppo, ecpo, gpg, bapo, ...), with
    `**method_options` its own options; the clip bounds stay `clip_eps_low/high` and `dual_clip`, the
    aggregation `token_level_loss`, and the is_correction weights apply as for ppo. `policy_loss_type` must
    then stay "ppo".

    `forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
    batch_num_tokens=None, global_batch_size=None)` returns OpenRLHF's tuple `(loss, clip_ratio, ppo_kl,
    vllm_kl, is_filter_ratio)`, the last two None when is_correction is off (or for gspo). The loss is fp32
    (fp64 for fp64 log-probs); an empty action mask gives 0 and zero metrics where OpenRLHF gives NaN.
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold: list = (0.5, 5.0), *, alignops_method: str | None = None,
                 **method_options) -> None:
        super().__init__()
        self.clip_eps_low = check_float("clip_eps_low", clip_eps_low, lo=0.0, hi=1.0)
        self.clip_eps_high = check_float("clip_eps_high", clip_eps_high, lo=0.0)
        self.dual_clip = check_float("dual_clip", dual_clip, lo=1.0, allow_none=True)
        self.token_level_loss = check_bool("token_level_loss", token_level_loss)
        self.policy_loss_type = check_choice("policy_loss_type", policy_loss_type, POLICY_LOSS_TYPES)
        self.is_correction_level = check_choice("is_correction_level", is_correction_level, IS_CORRECTION_LEVELS)
        self.is_correction_mode = check_choice("is_correction_mode", is_correction_mode, IS_CORRECTION_MODES)
        self.is_correction_gating = check_choice("is_correction_gating", is_correction_gating,
                                                 IS_CORRECTION_GATINGS)
        self.is_correction_threshold = _check_threshold(is_correction_threshold)
        # OpenRLHF's own rules: only a per-token ratio is a weight that can be clamped, and a divergence
        # gate is bounded above only.
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode='clip' requires is_correction_level='token' and "
                             "is_correction_gating='ratio'")
        if is_correction_gating != "ratio" and is_correction_level != "off" and self.is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating!r} takes an upper bound only: "
                             f"is_correction_threshold must be (0, delta), got {tuple(is_correction_threshold)}")
        if alignops_method is None:
            if method_options:
                raise TypeError(f"options {sorted(method_options)} need alignops_method (the alignops method "
                                "they belong to)")
            self.method = policy_loss_type
        else:
            if policy_loss_type != "ppo":
                raise ValueError(f"give policy_loss_type or alignops_method, not both "
                                 f"(got {policy_loss_type!r} and {alignops_method!r})")
            resolve_options(get_method(alignops_method), method_options)
            self.method = alignops_method
        self.alignops_method = alignops_method
        self.method_options = dict(method_options)
        self.gspo = alignops_method is None and policy_loss_type == "gspo"
        if self.gspo:
            self.token_level_loss = False

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, clip_eps=({self.clip_eps_low}, {self.clip_eps_high}), "
                f"dual_clip={self.dual_clip}, token_level_loss={self.token_level_loss}, "
                f"is_correction={self.is_correction_level}/{self.is_correction_mode}/{self.is_correction_gating}")

    def _is_correction(self, old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, rows: layout.Rows, dtype):
        """Per-token IS weights pi_train / pi_rollout after the gate, and the filtered share."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        old = layout.sanitize(old_logp.detach(), mask, dtype)
        rollout = layout.sanitize(rollout_logp.detach(), mask, dtype)
        token_is = torch.exp(old - rollout)
        if self.is_correction_gating == "ratio":
            # a sequence's ratio is the geometric mean of its token ratios
            stat = torch.exp(rows.row_mean(old - rollout, mask)) if seq_level else token_is
        else:
            p = rollout.exp().clamp(GATE_PROB_CLAMP, 1 - GATE_PROB_CLAMP)
            q = old.exp().clamp(GATE_PROB_CLAMP, 1 - GATE_PROB_CLAMP)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = rows.row_mean(stat, mask)
        if self.is_correction_mode == "clip":
            weights = stat.clamp(low, high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            filtered = ~keep
            if seq_level:
                keep = rows.to_tokens(keep)
            weights = torch.where(keep, token_is, torch.zeros((), dtype=dtype, device=token_is.device))
        if seq_level:
            # OpenRLHF's share is over all sequences, and an empty one counts as filtered (its mean is 0/0)
            filtered = filtered | (rows.lengths(mask) == 0)
            return weights, filtered.float().mean()
        return weights, layout.token_mean(filtered.float(), mask)

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                action_mask: Tensor | None = None, rollout_log_probs: Tensor | None = None, dp_size: int = 1,
                batch_num_tokens=None, global_batch_size=None):
        _check_tokens("log_probs", log_probs)
        if old_log_probs is None:
            raise ValueError("old_log_probs is required (OpenRLHF's PolicyLoss has no on-policy default)")
        layout.check_like("old_log_probs", old_log_probs, log_probs)
        layout.check_like("rollout_log_probs", rollout_log_probs, log_probs)
        dp_size = _check_dp_size(dp_size)
        mask = layout.token_mask(action_mask, log_probs.shape, log_probs.device, "action_mask")
        rows = layout.Rows(log_probs.shape, log_probs.device)
        dtype = layout.compute_dtype(torch.promote_types(log_probs.dtype, old_log_probs.dtype))
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError(f"rollout_log_probs is required with is_correction_level="
                             f"{self.is_correction_level!r}")

        behaviour, weights, vllm_kl, is_filter_ratio = old_log_probs, None, None, None
        if correcting and self.gspo:
            behaviour = rollout_log_probs
        elif correcting:
            weights, is_filter_ratio = self._is_correction(old_log_probs, rollout_log_probs, mask, rows, dtype)
            vllm_kl = layout.token_mean((rollout_log_probs - old_log_probs).detach(), mask)

        if self.token_level_loss:
            norm = _step_normalizer(batch_num_tokens, dp_size, "batch_num_tokens", dtype, log_probs.device)
        else:
            norm = _step_normalizer(global_batch_size, dp_size, "global_batch_size", dtype, log_probs.device)
        out = ao.policy_loss(log_probs, behaviour, advantages, mask, method=self.method,
                             clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, clip_ratio_c=self.dual_clip,
                             agg=_agg(self.token_level_loss), normalizer=norm, rollout_is_weights=weights,
                             ratio_log_clamp=None if self.gspo else PPO_LOG_RATIO_CLAMP,
                             **self.method_options)
        # OpenRLHF's clip_ratio counts the tokens where the clipped surrogate is the smaller one: r above
        # 1 + eps_high with A > 0 or below 1 - eps_low with A < 0, alignops's clip_ratio/region.
        clip_ratio = out.metrics.get("clip_ratio/region", torch.zeros((), device=log_probs.device))
        ppo_kl = layout.token_mean((old_log_probs - log_probs).detach(), mask)
        return out.loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


# --------------------------------------------------------------------------------------------
# the other losses of openrlhf/models/loss.py


class ValueLoss(nn.Module):
    """OpenRLHF's `ValueLoss(clip_eps=None, token_level_loss=True)` on `ao.value_loss`:
    `forward(values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
    global_batch_size=None)` = 1/2 Agg(max((V - R)^2, (V_old + clip(V - V_old, +-clip_eps) - R)^2))."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = check_float("clip_eps", clip_eps, lo=0.0, allow_none=True)
        self.token_level_loss = check_bool("token_level_loss", token_level_loss)

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Tensor | None = None,
                dp_size: int = 1, batch_num_tokens=None, global_batch_size=None) -> Tensor:
        _check_tokens("values", values)
        dp_size = _check_dp_size(dp_size)
        dtype = layout.compute_dtype(values.dtype)
        if self.token_level_loss:
            norm = _step_normalizer(batch_num_tokens, dp_size, "batch_num_tokens", dtype, values.device)
        else:
            norm = _step_normalizer(global_batch_size, dp_size, "global_batch_size", dtype, values.device)
        mask = layout.token_mask(action_mask, values.shape, values.device, "action_mask")
        return ao.value_loss(values, old_values, returns, mask, cliprange_value=self.clip_eps,
                             agg=_agg(self.token_level_loss), normalizer=norm).loss


class SFTLoss(nn.Module):
    """OpenRLHF's `SFTLoss(token_level_loss=True)`: `forward(per_token_logps, loss_mask, dp_size=1,
    batch_num_tokens=None, global_batch_size=None)` = aggregate_loss(-per_token_logps, ...)."""

    def __init__(self, token_level_loss: bool = True) -> None:
        super().__init__()
        self.token_level_loss = check_bool("token_level_loss", token_level_loss)

    def forward(self, per_token_logps: Tensor, loss_mask: Tensor, dp_size: int = 1, batch_num_tokens=None,
                global_batch_size=None) -> Tensor:
        _check_tokens("per_token_logps", per_token_logps)
        return aggregate_loss(-per_token_logps, loss_mask, self.token_level_loss, dp_size, batch_num_tokens,
                              global_batch_size)


class GPTLMLoss(nn.Module):
    """OpenRLHF's `GPTLMLoss()` on alignops's fused logits pass: `forward(logits [B, T, V], labels [B, T])`
    is the mean next-token cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` over the labels that
    are not -100, read in place (no shifted copy of the logits). All labels ignored gives 0. Ring attention
    (`ring_attn_group`) is not supported."""

    def __init__(self, ring_attn_group=None):
        super().__init__()
        if ring_attn_group is not None:
            raise NotImplementedError("GPTLMLoss: ring_attn_group (ring attention) is not supported by alignops; "
                                      "use OpenRLHF's GPTLMLoss for ring-attention runs")
        self.IGNORE_INDEX = IGNORE_INDEX
        self.ring_attn_group = None

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if not isinstance(logits, Tensor) or logits.dim() != 3:
            raise ValueError(f"logits must be a [B, T, V] tensor, got "
                             f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"labels must be [B, T] = {tuple(logits.shape[:2])}, got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        targets = labels[:, 1:]
        logp = ao.token_logprobs(logits[:, :-1], targets, ignore_index=IGNORE_INDEX)
        valid = targets != IGNORE_INDEX
        return layout.aggregate(-logp, valid, layout.Rows(valid.shape, valid.device), "token-mean",
                                valid.sum().to(logp.dtype))


class DPOLoss(nn.Module):
    """OpenRLHF's `DPOLoss(beta, label_smoothing=0.0, ipo=False)` on `ao.dpo_loss` (sigmoid / cDPO, or IPO on
    the summed log-ratios): `forward(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
    reference_rejected_logps)` returns `(loss, chosen_rewards, rejected_rewards)`."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> None:
        super().__init__()
        self.beta = check_float("beta", beta, lo=0.0)
        self.ipo = check_bool("ipo", ipo)
        self.label_smoothing = check_float("label_smoothing", label_smoothing, lo=0.0, hi=0.5, lo_open=False)
        if self.ipo and self.label_smoothing != 0.0:
            raise ValueError(f"label_smoothing has no meaning with ipo=True (OpenRLHF ignores it); "
                             f"got {label_smoothing}")

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                reference_rejected_logps: Tensor):
        out = ao.dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                          reference_rejected_logps, beta=self.beta, loss_type="ipo" if self.ipo else "sigmoid",
                          label_smoothing=self.label_smoothing, ipo_length_norm=False)
        return out.loss, out.chosen_rewards, out.rejected_rewards


# --------------------------------------------------------------------------------------------
# the actor's logits pass (openrlhf/models/utils.py)


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """OpenRLHF's `log_probs_from_logits` on `ao.token_logprobs`: log softmax(logits / temperature) at `labels`,
    one fused pass (no fp32 copy of the logits kept for backward). Unlike OpenRLHF's, it does not divide the
    logits in place. Labels must lie in [0, V) (or be -100: log-prob 0)."""
    return ao.token_logprobs(logits, labels, temperature=temperature)


def compute_entropy(logits: Tensor) -> Tensor:
    """OpenRLHF's `compute_entropy` on alignops's fused pass: the entropy of softmax(logits) at every position,
    with its gradient, without the softmax tensor OpenRLHF's version keeps for backward."""
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise ValueError(f"logits must be a [..., V] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    # the entropy needs no label; any in-range one serves
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return ao.token_logprobs(logits, labels, compute_entropy=True)[1]


# --------------------------------------------------------------------------------------------
# use_alignops


REPLACEMENTS = {"PolicyLoss": PolicyLoss, "ValueLoss": ValueLoss, "SFTLoss": SFTLoss, "DPOLoss": DPOLoss,
                "GPTLMLoss": GPTLMLoss, "aggregate_loss": aggregate_loss,
                "log_probs_from_logits": log_probs_from_logits, "compute_entropy": compute_entropy}
# Where OpenRLHF defines the replaced names, and the package and the Actor that import them by name.
OPENRLHF_MODULES = ("openrlhf.models.loss", "openrlhf.models.utils", "openrlhf.models.actor", "openrlhf.models")
# The trainer modules that import the losses by name from openrlhf.models.
OPENRLHF_CONSUMERS = ("openrlhf.trainer.ray.ppo_actor", "openrlhf.trainer.ray.ppo_critic",
                      "openrlhf.trainer.sft_trainer", "openrlhf.trainer.dpo_trainer")


def _configured_policy_loss(alignops_method, method_options):
    """PolicyLoss with the alignops method preset, so that OpenRLHF's actor, which passes only its own
    arguments, builds it."""
    PolicyLoss(alignops_method=alignops_method, **method_options)  # bad names fail here, not in a Ray worker

    class ConfiguredPolicyLoss(PolicyLoss):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("alignops_method", alignops_method)
            for k, v in method_options.items():
                kwargs.setdefault(k, v)
            super().__init__(*args, **kwargs)

    ConfiguredPolicyLoss.__name__ = ConfiguredPolicyLoss.__qualname__ = "PolicyLoss"
    return ConfiguredPolicyLoss


def _openrlhf_modules() -> list:
    try:
        modules = [importlib.import_module(name) for name in OPENRLHF_MODULES]
    except ImportError as e:
        raise ImportError(f"use_alignops() patches the installed openrlhf package, whose import failed ({e}); "
                          "pass modules=[...] to patch module objects of your own") from e
    return modules + [sys.modules[name] for name in OPENRLHF_CONSUMERS if name in sys.modules]


class AlignopsPatch:
    """What use_alignops returns: `restore()` (or leaving its `with` block) puts back what it replaced."""

    def __init__(self, replacements: dict, modules: list):
        self.replacements = replacements
        self.modules = modules
        self._replaced: list[tuple[object, str, object]] = []

    def install(self) -> "AlignopsPatch":
        for module in self.modules:
            for name, ours in self.replacements.items():
                if hasattr(module, name):
                    self._replaced.append((module, name, getattr(module, name)))
                    setattr(module, name, ours)
        return self

    @property
    def active(self) -> bool:
        return bool(self._replaced)

    def restore(self) -> None:
        for module, name, _ in self._replaced:
            if getattr(module, name) is not self.replacements[name]:
                raise RuntimeError(f"use_alignops patches restored out of order ({module.__name__}.{name} was "
                                   "replaced again): restore the most recent one first")
        for module, name, theirs in reversed(self._replaced):
            setattr(module, name, theirs)
        self._replaced = []

    def __enter__(self) -> "AlignopsPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def use_alignops(alignops_method: str | None = None, *, modules=None, **method_options) -> AlignopsPatch:
    """Makes OpenRLHF run on alignops: replaces `PolicyLoss`, `ValueLoss`, `SFTLoss`, `DPOLoss`, `GPTLMLoss`,
    `aggregate_loss`, and the Actor's `log_probs_from_logits` and `compute_entropy`, in every module of
    `modules` that holds them.

    Args:
        alignops_method, **method_options: the alignops method (and its options) of every PolicyLoss built
            from now on (None: OpenRLHF's own policy_loss_type).
        modules: the module objects to patch. None: `openrlhf.models.loss`, `.utils`, `.actor`,
            `openrlhf.models` and the trainer modules that import the losses from it, when already imported
            (later imports take the patched names from openrlhf.models).

    Returns:
        An AlignopsPatch: on at once; `restore()` or the end of a `with` block undoes it. A loss object
        built before the call stays OpenRLHF's.
    """
    replacements = dict(REPLACEMENTS)
    if alignops_method is not None or method_options:
        replacements["PolicyLoss"] = _configured_policy_loss(alignops_method, method_options)
    if modules is None:
        modules = _openrlhf_modules()
    elif isinstance(modules, (str, bytes)) or not hasattr(modules, "__iter__"):
        raise TypeError(f"modules must be a list of module objects or None, got {type(modules).__name__}")
    return AlignopsPatch(replacements, list(modules)).install()


__all__ = ["PolicyLoss", "ValueLoss", "SFTLoss", "GPTLMLoss", "DPOLoss", "aggregate_loss", "log_probs_from_logits",
           "compute_entropy", "use_alignops", "AlignopsPatch"]
