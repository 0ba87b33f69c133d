"""alignops inside TRL 1.16: its fused lm_head on alignops's kernels, and GRPO's whole policy loss in one call.

    from alignops.integrations.trl import use_alignops
    use_alignops()                  # every TRL trainer's fused lm_head now runs ao.fused_linear_token_logprobs
    with use_alignops(backend="triton"):
        trainer.train()             # TRL's own function is back when the block ends (or after .restore())

    from alignops.integrations.trl import AlignopsGRPOConfig, AlignopsGRPOTrainer
    args = AlignopsGRPOConfig(output_dir="out", loss_type="dapo", beta=0.001)      # or alignops_method="gppo"
    AlignopsGRPOTrainer(model=model_id, reward_funcs=reward, args=args, train_dataset=ds).train()

TRL's trainers score tokens through `model(..., labels=labels, fused_lm_head=True)` (added by
`trl.trainer.utils.add_fused_lm_head`), which looks `trl.trainer.utils._ChunkedLogProbFunction` up
at call time; use_alignops replaces that name with a function of the same signature and outputs.
AlignopsGRPOTrainer hands that function the whole policy loss of a micro-batch instead
(docs/integrations/trl.md).
"""

from __future__ import annotations

import dataclasses
import json

import torch
import trl.trainer.utils as trl_utils
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

import alignops as ao
from alignops import layout
from alignops._validate import check_float
from alignops.policy import math as pmath
from alignops.policy.registry import get_method, resolve_options
from alignops.rollout_correction import PREFIX as ROLLOUT_METRIC_PREFIX
from alignops.rollout_correction import check_route_options

TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


# --------------------------------------------------------------------------------------------
# the chunked lm_head function


def _check_outputs(outputs) -> tuple[str, ...]:
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple of names from {TRL_OUTPUTS}, got {outputs!r}")
    unknown = [o for o in outputs if o not in TRL_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs has unknown names {unknown}; known: {TRL_OUTPUTS}")
    return tuple(outputs)


def _head_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype TRL projects in: the autocast dtype when autocast is on, else the hidden states' own."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


@torch.no_grad()
def _distribution_stats(hidden, weight, bias, targets, temperature, softcap, logit_scale, want, rows):
    """The no-gradient outputs TRL offers besides log-probs and entropy, one logits tile of `rows` tokens at a time:
    log(sum_v p_v^2), the mean transformed logit, and whether the target is the first argmax."""
    n, vocab = hidden.shape[0], weight.shape[0]
    out = {}
    if "log_sum_sq_probs" in want:
        out["log_sum_sq_probs"] = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if "mean_logits" in want:
        out["mean_logits"] = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if "is_top1" in want:
        out["is_top1"] = torch.empty(n, dtype=torch.bool, device=hidden.device)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z = hidden[s:e] @ weight.t()
        if bias is not None:
            z = z + bias
        z = z.float()
        if logit_scale is not None:
            z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        if "log_sum_sq_probs" in out:
            out["log_sum_sq_probs"][s:e] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
        if "mean_logits" in out:
            out["mean_logits"][s:e] = z.sum(-1) / vocab
        if "is_top1" in out:
            out["is_top1"][s:e] = z.argmax(-1) == targets[s:e]
    return out


class AlignopsChunkedLogProb:
    """A stand-in for `trl.kernels.ChunkedLogProbFunction`: `apply(hidden [N, H], weight [V, H], bias, targets [N],
    temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)` returns TRL's 5-tuple
    `(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`, None where not asked for.

    log_probs and entropy come from ao.fused_linear_token_logprobs, with their gradients; the other three (no
    gradient, as in TRL) from one extra logits pass, only when asked for (SFT, DPO and KTO ask; GRPO does not).
    TRL's `chunk_size` is the width of its vocabulary tiles: alignops never splits the vocabulary, so it is
    checked and not used; alignops's own tile is `chunk_size` token rows here (None: its default)."""

    def __init__(self, backend: str | None = None, chunk_size: int | None = None):
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if backend is not None:
            if backend not in ao.BACKENDS:
                raise ValueError(f"backend must be one of {ao.BACKENDS} or None, got {backend!r}")
        self.backend = backend
        self.chunk_rows = chunk_size
        self.request = None       # AlignopsGRPOTrainer's policy loss, served by the next call

    def apply(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
              chunk_size: int, final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
              outputs: tuple[str, ...] = TRL_OUTPUTS):
        outputs = _check_outputs(outputs)
        request, self.request = self.request, None
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(hidden, Tensor) or hidden.dim() != 2:
            raise ValueError(f"hidden must be a [N, H] tensor, got {getattr(hidden, 'shape', type(hidden).__name__)}")
        softcap = check_float("final_logit_softcapping", final_logit_softcapping, lo=0.0, allow_none=True)
        logit_scale = check_float("logit_scale", logit_scale)
        scale = None if logit_scale == 1.0 else logit_scale
        dtype = _head_dtype(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        want_entropy = "entropy" in outputs
        if request is not None:
            with torch.autocast(hidden.device.type, enabled=False):
                return request.serve(self, h, w, b, targets, float(temperature), softcap, scale)
        with torch.autocast(hidden.device.type, enabled=False):
            res = ao.fused_linear_token_logprobs(h, w, targets, b, temperature=temperature,
                                                 compute_entropy=want_entropy, softcap=softcap, logit_scale=scale,
                                                 backend=self.backend, chunk_size=self.chunk_rows)
            logp, entropy = res if want_entropy else (res, None)
            extra = {}
            if any(o in outputs for o in TRL_OUTPUTS[2:]):
                rows = self.chunk_rows or max(1, min(4096, (64 << 20) // (4 * max(1, w.shape[0]))))
                extra = _distribution_stats(h.detach(), w.detach(), None if b is None else b.detach(), targets,
                                            float(temperature), softcap, scale, outputs, rows)
        return (logp, entropy, extra.get("log_sum_sq_probs"), extra.get("mean_logits"), extra.get("is_top1"))


class AlignopsPatch:
    """What use_alignops returns: `restore()` (or leaving its `with` block) puts back the function it replaced."""

    def __init__(self, function: AlignopsChunkedLogProb):
        self.function = function
        self._replaced = None
        self._active = False

    def install(self) -> "AlignopsPatch":
        self._replaced = trl_utils._ChunkedLogProbFunction
        trl_utils._ChunkedLogProbFunction = self.function
        self._active = True
        return self

    @property
    def active(self) -> bool:
        return self._active

    def restore(self) -> None:
        if not self._active:
            return
        if trl_utils._ChunkedLogProbFunction is not self.function:
            raise RuntimeError("use_alignops patches restored out of order: restore the most recent one first")
        trl_utils._ChunkedLogProbFunction = self._replaced
        self._active = False

    def __enter__(self) -> "AlignopsPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def use_alignops(backend: str | None = None, chunk_size: int | None = None) -> AlignopsPatch:
    """Runs TRL's fused lm_head (`trl.trainer.utils._ChunkedLogProbFunction`) on ao.fused_linear_token_logprobs.

    Args:
        backend: alignops backend for the logits pass (None: automatic).
        chunk_size: token rows per logits tile (None: alignops's default, a 64 MiB fp32 tile of at least 512 rows).

    Returns:
        An AlignopsPatch: the patch is on at once; `restore()` or the end of a `with` block undoes it.
    """
    return AlignopsPatch(AlignopsChunkedLogProb(backend, chunk_size)).install()


def trl_chunked_function():
    """The function TRL's fused lm_head calls now (TRL's own, or an alignops stand-in)."""
    return trl_utils._ChunkedLogProbFunction


# --------------------------------------------------------------------------------------------
# GRPO's policy loss from the hidden states


# TRL loss_type -> (alignops per-token method at token-level / sequence-level importance sampling, aggregation).
# The aggregation's normaliser is TRL's, computed per call in AlignopsGRPOTrainer._normalizer.
CLIP_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
TRL_LOSSES = {
    "grpo": ("ppo", "gspo", "seq-mean-token-mean"),
    "bnpo": ("ppo", "gspo", "token-mean"),
    "dr_grpo": ("ppo", "gspo", "token-mean"),
    "dapo": ("ppo", "gspo", "token-mean"),
    "luspo": ("ppo", "gspo", "token-mean"),
    "cispo": ("cispo", None, "token-mean"),
    "sapo": ("sapo", None, "seq-mean-token-mean"),
    # VESPO weighs by the sequence's own importance weight whatever importance_sampling_level says
    "vespo": ("vespo", "vespo", "token-mean"),
}
# the keywords of policy_loss that alignops_method_kwargs may set besides the method's own options
SHARED_KNOBS = ("clip_low", "clip_high", "clip_ratio_c", "kl_estimator", "ratio_log_clamp")
# loss types whose logged policy_loss is the loss before the division by the accumulation steps
_GA_DIVIDED = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")

# TRL's vllm_importance_sampling_mode -> ao.rollout_correction's (level, mode)
TRL_IS_MODES = {
    "token_truncate": ("token", "truncate"),
    "token_mask": ("token", "mask"),
    "sequence_truncate": ("sequence", "truncate"),
    "sequence_mask": ("sequence", "mask"),
}


def trl_rollout_correction(mode: str = "sequence_mask", clip_min: float | None = None,
                           clip_max: float | None = 3.0) -> dict:
    """The `rollout_correction=` options of alignops's losses that give TRL's vLLM importance-sampling correction
    (`vllm_importance_sampling_mode`, `vllm_importance_sampling_clip_min`, `vllm_importance_sampling_clip_max`; TRL's
    defaults here): the ratio exp(old - rollout) per token, or per sequence (the product over the row), truncated to
    [clip_min, clip_max] (`*_truncate`) or zeroed outside it (`*_mask`), its exponent not clamped (TRL clamps none).

        spec = trl_rollout_correction(args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_min,
                                      args.vllm_importance_sampling_clip_max)
        ao.policy_loss(logp, old_logp, adv, mask, rollout_logp=sampling_logp, rollout_correction=spec)
    """
    if not isinstance(mode, str) or mode not in TRL_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {tuple(TRL_IS_MODES)}, got {mode!r}")
    low = check_float("vllm_importance_sampling_clip_min", clip_min, lo=0.0, lo_open=False, allow_none=True)
    high = check_float("vllm_importance_sampling_clip_max", clip_max, lo=0.0, allow_none=True)
    if low is not None and high is not None and low > high:
        raise ValueError(f"vllm_importance_sampling_clip_min ({low}) must not exceed "
                         f"vllm_importance_sampling_clip_max ({high})")
    level, how = TRL_IS_MODES[mode]
    if how == "truncate" and low is None and high is None:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r} needs vllm_importance_sampling_clip_min or "
                         "vllm_importance_sampling_clip_max (a truncation without bounds)")
    spec = {"level": level, "mode": how, "threshold": (low, high), "ratio_log_clamp": None}
    check_route_options(spec)
    return spec


@dataclasses.dataclass
class AlignopsGRPOConfig(GRPOConfig):
    """GRPOConfig plus the alignops options of AlignopsGRPOTrainer.

    alignops_method: an alignops method name (`alignops.policy.method_names()`: gppo, ecpo, bapo, gspo-token, ...)
        for the per-token loss, None for the one of TRL's `loss_type`. `loss_type` still sets the normalisation.
    alignops_method_kwargs: that method's options and shared knobs (clip_low, clip_high, clip_ratio_c, ...), as a
        dict or a JSON string; the method's registry defaults apply to the rest (TRL's epsilon is not used).
    alignops_backend, alignops_chunk_size: the backend and the token rows per logits tile.
    """
    alignops_method: str | None = dataclasses.field(
        default=None, metadata={"help": "alignops method for the per-token loss (None: TRL's loss_type)."})
    alignops_method_kwargs: dict | str | None = dataclasses.field(
        default=None, metadata={"help": "options of alignops_method (dict or JSON string)."})
    alignops_backend: str | None = dataclasses.field(
        default=None, metadata={"help": "alignops backend: torch, cpu, triton, cuda (None: automatic)."})
    alignops_chunk_size: int | None = dataclasses.field(
        default=None, metadata={"help": "token rows per logits tile (None: alignops's default)."})


def _grid(x: Tensor, width: int) -> Tensor:
    """[B, C] completion values placed in the last C columns of the [B, width] grid of next-token positions."""
    out = x.new_zeros(x.shape[0], width)
    out[:, width - x.shape[1]:] = x
    return out


class _LossRequest:
    """One micro-batch's policy loss, handed to the patched lm_head function, which TRL calls with the last hidden
    states and the head inside the model's own forward (so DDP, FSDP and ZeRO-3 see a normal forward)."""

    def __init__(self, input_ids, attention_mask, completion_len, mask, advantages, old_logp, loss_kwargs,
                 want_logp: bool):
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-completion_len] = -100
        self.label_mask = labels[:, 1:] != -100
        self.completion_len = completion_len
        self.mask, self.advantages, self.old_logp = mask, advantages, old_logp
        self.loss_kwargs = loss_kwargs
        self.want_logp = want_logp
        self.weighted_kl = None        # (ref_logp [B, C], beta) for TRL's ratio-weighted KL
        self.sequence_ratio = False    # that KL's ratio: TRL's sequence-level one
        self._select = None
        self.output = None

    def _rows(self, n: int):
        """(select, cu_seqlens): which next-token positions the function's N rows are. Off Triton devices TRL
        scores every position (N = B * (T - 1)); on them only the labelled ones."""
        B, width = self.label_mask.shape
        if n == B * width:
            lengths = torch.full((B,), width, dtype=torch.int64, device=self.label_mask.device)
            select = None
        elif n == int(self.label_mask.sum()):
            lengths, select = self.label_mask.sum(-1), self.label_mask
        else:
            raise RuntimeError(f"the lm_head function got {n} rows, neither every position ({B * width}) nor the "
                               f"labelled ones ({int(self.label_mask.sum())})")
        cu = torch.zeros(B + 1, dtype=torch.int32, device=self.label_mask.device)
        cu[1:] = lengths.cumsum(0)
        return select, cu

    def _flat(self, x, select, device):
        if x is None:
            return None
        g = _grid(x, self.label_mask.shape[1])
        return (g.reshape(-1) if select is None else g[select]).to(device)

    def serve(self, fn: AlignopsChunkedLogProb, h, w, b, targets, temperature, softcap, scale):
        n = h.shape[0]
        select, cu = self._rows(n)
        self._select = select
        B, C = self.mask.shape
        adv = self.advantages if self.advantages.dim() == 2 else self.advantages[:, None].expand(B, C)
        kwargs = dict(self.loss_kwargs)
        for name in ("ref_logp", "rollout_is_weights", "rollout_logp"):
            if name in kwargs:
                kwargs[name] = self._flat(kwargs[name], select, h.device)
        old, adv = self._flat(self.old_logp, select, h.device), self._flat(adv, select, h.device)
        mask = self._flat(self.mask, select, h.device) != 0
        cu = cu.to(h.device)
        head = dict(bias=b, temperature=temperature, softcap=softcap, logit_scale=scale, backend=fn.backend,
                    chunk_size=fn.chunk_rows)
        if self.weighted_kl is not None:
            logp = self._weighted_kl_loss(h, w, targets, old, adv, mask, cu, head, kwargs)
            return self._through_output(logp), torch.zeros_like(logp), None, None, None
        self.output = ao.fused_linear_policy_loss(h, w, targets, old, adv, mask, compute_entropy=True,
                                                  grad_in_forward=True, cu_seqlens=cu, **head, **kwargs)
        if self.want_logp:
            with torch.no_grad():
                logp = ao.fused_linear_token_logprobs(h.detach(), w.detach(), targets,
                                                      None if b is None else b.detach(), temperature=temperature,
                                                      softcap=softcap, logit_scale=scale, backend=fn.backend,
                                                      chunk_size=fn.chunk_rows)
        else:
            logp = torch.zeros(n, dtype=torch.float32, device=h.device)
        return self._through_output(logp), torch.zeros_like(logp), None, None, None

    def _through_output(self, logp: Tensor) -> Tensor:
        """The log-probs the model's forward returns, carrying the loss's gradient edge. A loss that is not
        one of the forward's outputs gets its backward before the engine's hooks on those outputs have run:
        ZeRO-3 has re-partitioned the lm_head by then (the gradient, taken in forward, no longer fits the
        weight), where the outputs' hooks gather it again for their backward."""
        loss = self.output.loss
        return _CarryLoss.apply(logp, loss) if loss.requires_grad else logp

    def loss_from_output(self, logps: Tensor) -> Tensor:
        """The policy loss, its backward routed through `logps`, the [B, C] log-probs the model returned."""
        loss = self.output.loss
        if not loss.requires_grad:
            return loss
        if logps.shape != self.mask.shape or not logps.requires_grad:
            raise RuntimeError(f"the model returned log-probs of shape {tuple(logps.shape)} (requires_grad="
                               f"{logps.requires_grad}) for a completion mask of {tuple(self.mask.shape)}")
        # the first scored token's position (where the forward's masking keeps the gradient), found without a host
        # sync; with none, the loss is constant in the parameters and position 0 will do
        at = (self.mask.reshape(-1) != 0).to(torch.uint8).argmax().reshape(1)
        return _LossFromOutput.apply(loss, logps, at)

    def _weighted_kl_loss(self, h, w, targets, old, adv, mask, cu, head, kwargs):
        """TRL's use_bias_correction_kl: beta * Agg(r * k3) with the differentiable ratio r, a term alignops's KL
        (beta * Agg(k3)) does not have. The log-probs then come from ao.fused_linear_token_logprobs with autograd,
        the policy term from ao.policy_loss on them, and the weighted KL is added here."""
        ref, beta = self.weighted_kl
        ref = self._flat(ref, self._select, h.device)
        estimator = kwargs.pop("kl_estimator", "k3")
        params = [h, w, head.pop("bias")]
        needs_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
        leaves = [None if p is None else p.detach().requires_grad_(needs_grad and p.requires_grad) for p in params]
        with torch.enable_grad() if needs_grad else torch.no_grad():
            logp, entropy = ao.fused_linear_token_logprobs(leaves[0], leaves[1], targets, leaves[2],
                                                           compute_entropy=True, **head)
            out = ao.policy_loss(logp, old, adv, mask, entropy=entropy, cu_seqlens=cu, **kwargs)
            rows = layout.token_layout("logp", logp, cu)
            log_ratio = logp - (logp.detach() if old is None else old)
            if self.sequence_ratio:
                log_ratio = rows.to_tokens(rows.row_mean(torch.where(mask, log_ratio, 0.0), mask))
            kl = torch.where(mask, torch.exp(log_ratio) * pmath.kl_penalty(logp, ref, estimator), 0.0)
            loss = out.loss + beta * layout.aggregate(kl, mask, rows, kwargs["agg"], kwargs["normalizer"])
        if needs_grad:
            # taken now, inside TRL's forward (where ZeRO-3 has the head gathered), as the terminal loss does
            wanted = [x for x in leaves if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
            grads = [next(got) if x is not None and x.requires_grad else None for x in leaves]
            loss = _TakenGradients.apply(loss.detach(), *params, *grads)
        out.loss = loss
        out.metrics["kl"] = layout.token_mean(kl.detach(), mask)
        self.output = out
        return logp.detach()


class _CarryLoss(torch.autograd.Function):
    """logp unchanged; backward hands the loss the sum of the gradient that reached logp."""

    @staticmethod
    def forward(ctx, logp, loss):
        ctx.loss_dtype = loss.dtype
        return logp.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad.sum().to(ctx.loss_dtype)


class _LossFromOutput(torch.autograd.Function):
    """The loss's value; backward puts its gradient on one scored element of the returned log-probs, which
    _CarryLoss hands back to the loss (a unit gradient passes TRL's slicing and masking unchanged)."""

    @staticmethod
    def forward(ctx, loss, logps, at):
        ctx.shape, ctx.dtype = logps.shape, logps.dtype
        ctx.save_for_backward(at)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        (at,) = ctx.saved_tensors
        d = grad.new_zeros(ctx.shape, dtype=ctx.dtype)
        d.view(-1).index_copy_(0, at, grad.reshape(1).to(ctx.dtype))
        return None, d, None


class _TakenGradients(torch.autograd.Function):
    """A loss whose gradients were already taken: backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.grads = (d_hidden, d_weight, d_bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        scaled = [None if d is None else d * grad_output.to(d.dtype) for d in ctx.grads]
        return (None, *scaled, None, None, None)


def _unsupported_correction(alignops_method, loss_type: str) -> str | None:
    """Why the vLLM importance-sampling correction cannot go through the rollout_logp route here, or None."""
    if alignops_method is None and loss_type == "vespo":
        return ("loss_type='vespo' with vllm_importance_sampling_correction: TRL adds the clamped log of the rollout "
                "ratio to VESPO's sequence log-weight, inside its Gamma gate, and does not multiply the loss by it; "
                "the rollout_logp route multiplies the policy term by the weights, and alignops's vespo has no input "
                "for an extra sequence log-weight (set vllm_importance_sampling_correction=False, or use another "
                "loss_type)")
    return None


def _unsupported(args, loss_type: str) -> str | None:
    """Why AlignopsGRPOTrainer cannot reproduce this GRPOConfig, or None."""
    if args.alignops_method is None and loss_type not in TRL_LOSSES:
        return (f"loss_type={loss_type!r} has no alignops method (alignops has {sorted(TRL_LOSSES)} of TRL's); use "
                "GRPOTrainer for it, or choose a per-token loss with alignops_method=")
    if args.alignops_method is None and args.importance_sampling_level == "sequence" \
            and TRL_LOSSES[loss_type][1] is None:
        return f"importance_sampling_level='sequence' with loss_type={loss_type!r} has no alignops method"
    if args.alignops_method is not None and args.importance_sampling_level != "token":
        return ("importance_sampling_level='sequence' with alignops_method: the method sets its own ratio level "
                "(gspo, gspo-token, ecpo's ratio_level)")
    if args.top_entropy_quantile < 1.0:
        return "top_entropy_quantile < 1 (the high-entropy token mask needs the entropies before the loss)"
    if args.off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold (the off-policy sequence mask needs the log-probs before the loss)"
    if args.delta is not None:
        return "delta (TRL's two-sided ratio cap; alignops's dual clip clip_ratio_c is a different bound)"
    if args.use_adaptive_entropy:
        return "use_adaptive_entropy"
    if args.entropy_coef != 0.0 and TRL_LOSSES.get(loss_type, ("", "", "token-mean"))[2] != "token-mean":
        return (f"entropy_coef with loss_type={loss_type!r}: TRL's bonus is a token mean, its policy term a mean of "
                "sequence means, and alignops aggregates both alike")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        why = _unsupported_correction(args.alignops_method, loss_type)
        if why is not None:
            return why
    if args.alignops_method is None and loss_type == "cispo" and (args.epsilon_high or args.epsilon) <= 1.0:
        return ("loss_type='cispo' with epsilon_high <= 1 (the ratio cap; alignops's cispo needs a cap above 1, "
                "ScaleRL uses 5.0)")
    return None


class AlignopsGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose policy loss is one ao.fused_linear_policy_loss call from the last hidden states and the
    lm_head weight (a terminal loss: its gradients are taken inside the model's forward), with TRL's normalisation,
    gradient-accumulation scaling, k3 KL (beta), entropy bonus (entropy_coef) and metric names. vLLM's
    importance-sampling correction runs inside that call: TRL's sampling_per_token_logps go in as rollout_logp= with
    trl_rollout_correction's options. Old and reference log-probs are scored through use_alignops. Configure with
    AlignopsGRPOConfig (a plain GRPOConfig works too).

        trainer = AlignopsGRPOTrainer(model="Qwen/Qwen2.5-0.5B", reward_funcs=reward, train_dataset=ds,
                                      args=AlignopsGRPOConfig(output_dir="out", loss_type="dapo", beta=0.001))
        trainer = AlignopsGRPOTrainer(..., args=AlignopsGRPOConfig(..., alignops_method="gppo",
                                      alignops_method_kwargs={"gppo_beta1": 0.5}))
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        for name, default in (("alignops_method", None), ("alignops_method_kwargs", None),
                              ("alignops_backend", None), ("alignops_chunk_size", None)):
            if not hasattr(a, name):
                setattr(a, name, default)
        why = _unsupported(a, self.loss_type)
        if why is not None:
            raise NotImplementedError(f"AlignopsGRPOTrainer does not support {why}")
        method_kwargs = a.alignops_method_kwargs
        if isinstance(method_kwargs, str):
            method_kwargs = json.loads(method_kwargs)
        if method_kwargs is not None and not isinstance(method_kwargs, dict):
            raise TypeError(f"alignops_method_kwargs must be a dict or a JSON object, got {method_kwargs!r}")
        if method_kwargs and a.alignops_method is None:
            raise ValueError("alignops_method_kwargs needs alignops_method (TRL's loss_type takes TRL's options)")
        self._alignops_kwargs = dict(method_kwargs or {})
        if a.alignops_method is not None:
            method = get_method(a.alignops_method)
            for key in ("agg", "normalizer", "ref_logp", "kl_coef", "entropy_coef", "rollout_is_weights",
                        "cu_seqlens", "max_len", "entropy", "method"):
                if key in self._alignops_kwargs:
                    raise ValueError(f"alignops_method_kwargs cannot set {key!r}: the trainer sets it from "
                                     "loss_type, beta and entropy_coef")
            resolve_options(method, {k: v for k, v in self._alignops_kwargs.items() if k not in SHARED_KNOBS})
        self._alignops_fn = AlignopsChunkedLogProb(a.alignops_backend, a.alignops_chunk_size)
        if a.use_vllm and a.vllm_importance_sampling_correction:
            self._rollout_spec()       # TRL's options checked now, not at the first loss

    def _rollout_spec(self) -> dict | None:
        """The rollout_correction= options of TRL's vLLM importance-sampling correction, or None when it is off."""
        if not (self.use_vllm and self.vllm_importance_sampling_correction):
            return None
        why = _unsupported_correction(self.args.alignops_method, self.loss_type)
        if why is not None:
            raise NotImplementedError(f"AlignopsGRPOTrainer does not support {why}")
        return trl_rollout_correction(self.vllm_importance_sampling_mode, self.vllm_importance_sampling_clip_min,
                                      self.vllm_importance_sampling_clip_max)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self._rollout_spec() is not None:
            # TRL's own ratio (it logs its sampling/* metrics from it) is not used: the loss computes the weights
            # from sampling_per_token_logps through the rollout_logp route
            output.pop("importance_sampling_ratio", None)
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        with AlignopsPatch(self._alignops_fn).install():
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _method_kwargs(self) -> dict:
        if self.args.alignops_method is not None:
            return {"method": self.args.alignops_method, **self._alignops_kwargs}
        token_method, sequence_method, _ = TRL_LOSSES[self.loss_type]
        method = sequence_method if self.importance_sampling_level == "sequence" else token_method
        # TRL takes exp of the raw log-ratio: no clamp
        if method == "cispo":
            # TRL caps the ratio at epsilon_high with no lower bound; alignops clips to [1 - clip_low, 1 + clip_high]
            return {"method": "cispo", "clip_low": 1.0, "clip_high": self.epsilon_high - 1.0, "ratio_log_clamp": None}
        if method == "sapo":
            return {"method": "sapo", "sapo_tau_pos": self.args.sapo_temperature_pos,
                    "sapo_tau_neg": self.args.sapo_temperature_neg, "ratio_log_clamp": None}
        if method == "vespo":  # TRL clamps VESPO's token log-ratios at +-20, as alignops does by default
            return {"method": "vespo", **{k: getattr(self.args, k) for k in ("vespo_k_pos", "vespo_lambda_pos",
                                                                           "vespo_k_neg", "vespo_lambda_neg")}}
        return {"method": method, "clip_low": self.epsilon_low, "clip_high": self.epsilon_high,
                "ratio_log_clamp": None}

    def _normalizer(self, inputs, mask: Tensor, mode: str):
        """TRL's denominator of this micro-batch's policy term, gradient accumulation included."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        rows = mask.shape[0]
        if self.loss_type in ("grpo", "sapo", "luspo"):
            return float(rows * accumulation)
        if self.loss_type == "bnpo":
            return mask.sum().clamp(min=1.0) * accumulation
        if self.loss_type == "dr_grpo":
            return float(rows * self.max_completion_length * accumulation)
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _global_mean(self, local_sum: Tensor, local_count: Tensor) -> float:
        totals = self.accelerator.reduce(torch.stack([local_sum.float(), local_count.float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.float()
        C = completion_ids.shape[1]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        count = mask.sum()

        normalizer = self._normalizer(inputs, mask, mode)
        _, _, agg = TRL_LOSSES.get(self.loss_type, (None, None, "token-mean"))
        loss_kwargs = {**self._method_kwargs(), "agg": agg, "normalizer": normalizer}
        if self.beta != 0.0 and not self.args.use_bias_correction_kl:
            loss_kwargs.update(ref_logp=inputs["ref_per_token_logps"], kl_coef=float(self.beta),
                               kl_estimator=loss_kwargs.get("kl_estimator", "k3"))
        rollout_spec = self._rollout_spec()
        if rollout_spec is not None:
            rollout_logp, old = inputs.get("sampling_per_token_logps"), inputs.get("old_per_token_logps")
            if rollout_logp is None or old is None:
                raise RuntimeError("vllm_importance_sampling_correction needs the rollout's sampling_per_token_logps "
                                   "and the recomputed old_per_token_logps in the inputs; the generation step gave "
                                   f"{sorted(k for k in inputs if k.endswith('per_token_logps'))}")
            # a token vLLM could not score (NaN) gets TRL's ratio 1: the rollout log-prob there is the trainer's own
            loss_kwargs.update(rollout_logp=torch.where(torch.isnan(rollout_logp), old, rollout_logp),
                               rollout_correction=rollout_spec)
        if self._entropy_bonus_enabled:
            # TRL's bonus is the micro-batch's token-mean entropy over the accumulation steps, whatever the policy
            # term's normaliser: the same term under alignops's shared normaliser takes a rescaled coefficient
            loss_kwargs["entropy_coef"] = float(self.entropy_coef * normalizer / (count.clamp(min=1.0) * accumulation))

        old_logp = inputs.get("old_per_token_logps")
        trl_clip_metrics = self.args.alignops_method is None and self.loss_type in CLIP_LOSSES
        request = _LossRequest(input_ids, attention_mask, C, mask, inputs["advantages"], old_logp, loss_kwargs,
                               want_logp=trl_clip_metrics and old_logp is not None)
        if self.beta != 0.0 and self.args.use_bias_correction_kl:
            request.weighted_kl = (inputs["ref_per_token_logps"], float(self.beta))
            request.sequence_ratio = self.importance_sampling_level == "sequence"
        self._alignops_fn.request = request
        try:
            logps, _, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, C, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
                pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                num_images=inputs.get("num_images"), pixel_attention_mask=inputs.get("pixel_attention_mask"),
                spatial_shapes=inputs.get("spatial_shapes"), num_tiles=inputs.get("num_tiles"),
                image_sizes=inputs.get("image_sizes"), token_type_ids=inputs.get("token_type_ids"),
                mm_token_type_ids=inputs.get("mm_token_type_ids"),
                image_position_ids=inputs.get("image_position_ids"))
        finally:
            self._alignops_fn.request = None
        if request.output is None:
            raise RuntimeError("the model's forward never reached TRL's fused lm_head (add_fused_lm_head); "
                               "AlignopsGRPOTrainer needs the model GRPOTrainer prepared")
        loss, metrics = request.loss_from_output(logps), request.output.metrics

        if self._entropy_bonus_enabled:
            entropy_term = self.entropy_coef * metrics["entropy"] / accumulation
            policy_loss = (loss.detach() + entropy_term) * (accumulation if self.loss_type in _GA_DIVIDED else 1)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(self._global_mean(metrics["kl"] * count, count))
        self._metrics[mode]["entropy"].append(self._global_mean(metrics["entropy"] * count, count))
        if trl_clip_metrics:
            self._log_clip_metrics(mode, logps, old_logp, inputs["advantages"], mask)
        elif self.args.alignops_method is None and self.loss_type == "cispo":
            self._metrics[mode]["cispo_clip_ratio"].append(self._global_mean(metrics["clip_ratio/high"] * count,
                                                                             count))
        elif self.args.alignops_method is None and self.loss_type == "vespo":
            rows = (mask.sum(-1) > 0).sum()
            self._metrics[mode]["vespo/phi_seq_mean"].append(
                self._global_mean(metrics["vespo/phi_seq_mean"] * rows, rows))
        elif self.args.alignops_method is not None:
            for name in ("low", "high", "region"):
                if f"clip_ratio/{name}" in metrics:
                    self._metrics[mode][f"clip_ratio/{name}_mean"].append(
                        self._global_mean(metrics[f"clip_ratio/{name}"] * count, count))
            for name, value in metrics.items():
                if "/" in name and not name.startswith(("clip_ratio/", "ratio/", ROLLOUT_METRIC_PREFIX)):
                    self._metrics[mode][f"alignops/{name}"].append(self.accelerator.gather(value).mean().item())
        if rollout_spec is not None:
            # the correction's metrics (verl's names) of this micro-batch, averaged over the processes
            names = sorted(k for k in metrics if k.startswith(ROLLOUT_METRIC_PREFIX))
            values = self.accelerator.gather(torch.stack([metrics[k].float() for k in names])[None])
            for name, value in zip(names, values.mean(0).tolist()):
                self._metrics[mode][name].append(value)
        return loss

    @torch.no_grad()
    def _log_clip_metrics(self, mode, logps, old_logp, advantages, mask):
        """TRL's clip_ratio/* metrics of the clipped-surrogate loss types, from the detached log-probs the loss
        call returned (off-policy) or ratio 1 (on-policy, where old = current)."""
        if advantages.dim() == 1:
            advantages = advantages[:, None]
        log_ratio = torch.zeros_like(mask) if old_logp is None else logps - old_logp
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
        ratio = torch.exp(log_ratio)
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        region = torch.maximum(low, high)

        def seq_mean(x):
            return x[:, 0] if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        def global_mean(x):
            if x.shape[1] == 1:
                return self._global_mean(x.sum(), torch.tensor(float(x.shape[0]), device=x.device))
            return self._global_mean((x * mask).sum(), mask.sum())

        m = self._metrics[mode]
        m["clip_ratio/low_mean"].append(global_mean(low))
        m["clip_ratio/high_mean"].append(global_mean(high))
        m["clip_ratio/region_mean"].append(global_mean(region))
        m["clip_ratio/low_min"].append(trl_utils.nanmin(self.accelerator.gather(seq_mean(low))).item())
        m["clip_ratio/high_max"].append(trl_utils.nanmax(self.accelerator.gather(seq_mean(high))).item())


__all__ = ["use_alignops", "AlignopsPatch", "AlignopsChunkedLogProb", "trl_chunked_function", "AlignopsGRPOConfig",
           "AlignopsGRPOTrainer", "TRL_LOSSES", "TRL_IS_MODES", "trl_rollout_correction"]
