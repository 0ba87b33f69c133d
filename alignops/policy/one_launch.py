"""The one-launch policy loss: a token-local method's per-token math inside the logits pass, which
writes the gradient row at once (fused_policy_loss(grad_in_forward=True) on the cpu and triton
backends).

Kernel contract, cpu (csrc/cpu/policy_loss.cpp) and triton (kernels/policy_loss.py):

    policy_loss_fused(logits, labels, old_logp, adv, ref_logp, is_weight, agg_norm, row_len, mask,
                      method, kl_estimator, knobs, flags, inv_temperature, ignore_index, compute_entropy,
                      logp, entropy, loss_terms, pg_terms, grad_logits)

    logits [B, T, V] with unit stride over V; per-token inputs [B*T] contiguous in the stats dtype,
    zeroed where mask is False; mask bool. agg_norm = the normaliser per token, row_len = the row's
    length (seq-mean-token-mean) or 1: a term's weight is (coef / agg_norm) / row_len.
    method, kl_estimator, knobs, flags: alignops/policy/kernel_abi.py. entropy is written only when
    compute_entropy.
    loss_terms.sum() is the loss and pg_terms.sum() the pg_loss (summed in float64); grad_logits
    may alias logits.
"""

from __future__ import annotations

import dataclasses

import torch

from alignops import _backend, layout
from alignops._validate import is_number
from alignops.policy import kernel_abi
from alignops.policy.autograd import PrecomputedGrad
from alignops.policy.loss import PolicyCall, PolicyLossOutput, compute, prepare_call
from alignops.policy.registry import METHODS, one_launch_knobs, resolve_options

# policy_loss's shared keywords; everything else fused_policy_loss is given is a method option
SHARED_KEYS = ("clip_low", "clip_high", "clip_ratio_c", "ref_logp", "kl_coef", "kl_estimator", "entropy_coef",
               "agg", "normalizer", "max_len", "rollout_is_weights", "ratio_log_clamp", "cu_seqlens")


def eligible(method, kwargs, backend, compute_entropy, labels, named) -> bool:
    """Whether the one-launch kernel runs. A token-local method on the cpu or triton backend runs it
    unless its kernel fails to load: then a named backend raises, and the automatic one warns once
    (naming the cause) and runs the two-pass kernels."""
    if backend not in ("cpu", "triton") or not isinstance(method, str) or method not in METHODS:
        return False
    m = METHODS[method]
    if m.one_launch is None:
        return False
    try:
        opts = resolve_options(m, {k: v for k, v in kwargs.items() if k not in SHARED_KEYS})
    except (TypeError, ValueError):
        return False  # the two-pass path raises the right error
    if not m.one_launch.applies(opts):
        return False  # e.g. a sequence-level ratio, or a statistic of the batch's groups
    entropy_coef = kwargs.get("entropy_coef", 0.0)
    if not compute_entropy and not (is_number(entropy_coef) and entropy_coef == 0):
        return False  # likewise
    if labels.dim() != (1 if kwargs.get("cu_seqlens") is not None else 2):
        return False  # likewise
    _, reason = _backend.kernel_or_reason("policy_loss_fused", backend)
    if reason is not None:
        msg = f"the one-launch policy kernel (policy_loss_fused, backend {backend!r}) cannot be loaded: {reason}"
        if named:
            raise _backend.BackendUnavailableError(
                f"backend={backend!r}: {msg}; pass grad_in_forward=False, or name no backend to fall back to "
                "the two-pass kernels")
        _backend.warn_once(f"alignops: {msg}; fused_policy_loss(grad_in_forward=True) runs the two-pass kernels "
                           "instead", stacklevel=4)
        return False
    return True


@dataclasses.dataclass
class OneLaunchCall:
    """The kernel's per-token inputs of one call, flat over the tokens; `launch` runs rows s:e."""
    call: PolicyCall
    dtype: torch.dtype
    tensors: tuple        # old_logp, adv, ref_logp, is_weight, agg_norm, row_len, mask: [N] each
    codes: tuple          # (method code, KL code)
    knobs: list
    flags: int
    compute_entropy: bool

    def launch(self, logits3, labels, s, e, temperature, ignore_index, backend, logp, entropy, loss_terms,
               pg_terms, grad_logits) -> None:
        """Rows s:e of the flat tokens, whose logits are `logits3` [1 or B, T, V]; writes the outputs' s:e."""
        if e <= s:
            return
        ins = [t[s:e] for t in self.tensors]
        _backend.kernel("policy_loss_fused", backend)(
            logits3, labels, *ins, *self.codes, self.knobs, self.flags, 1.0 / temperature, ignore_index,
            self.compute_entropy, logp[s:e], entropy[s:e], loss_terms[s:e], pg_terms[s:e], grad_logits)

    def finish(self, logp, entropy, loss_terms, pg_terms, shape) -> tuple[torch.Tensor, dict]:
        """(loss, metrics). The loss and pg_loss are the kernel's: each token's share of them (its
        weight (coef / normaliser) / row length included) summed in float64, so the order of the
        sum costs no digits. The other metrics come from torch on the kernel's logp and entropy: O(N)."""
        loss = loss_terms.sum(dtype=torch.float64).to(self.dtype)
        pg = pg_terms.sum(dtype=torch.float64).to(self.dtype)
        out = compute(self.call, logp.view(shape), entropy.view(shape) if self.compute_entropy else None)
        metrics = dict(out.metrics)
        metrics["pg_loss"] = pg.detach().to(torch.float32)
        return loss, metrics


def prepare(labels, old_logp, advantages, mask, method, compute_entropy, kwargs, dtype) -> OneLaunchCall:
    """Checks the arguments and lays out the kernel's per-token inputs for labels' tokens."""
    shared = {k: kwargs[k] for k in SHARED_KEYS if k in kwargs}
    options = {k: v for k, v in kwargs.items() if k not in SHARED_KEYS}
    call = prepare_call(labels, old_logp, advantages, mask, method=method, has_entropy=compute_entropy,
                        method_options=options, **shared)
    k, rows, mask = call.knobs, call.rows, call.mask
    # The kernel forms each term's weight as (coef / normaliser) / row length, the order autograd
    # takes through layout.aggregate, so a and b match the two-pass path's.
    agg_norm = call.norm(dtype).expand(labels.shape).reshape(-1).contiguous()
    if k.agg == "seq-mean-token-mean":
        row_len = rows.to_tokens(rows.lengths(mask, dtype).clamp(min=1)).reshape(-1).contiguous()
    else:
        row_len = torch.ones(labels.numel(), dtype=dtype, device=labels.device)

    def flat(x):
        return layout.sanitize(x.detach(), mask, dtype).reshape(-1).contiguous()

    adv = flat(call.advantages)
    kl_on = k.kl_coef > 0
    knobs, flags = kernel_abi.pack(one_launch_knobs(call.method, call.options, k), has_old=old_logp is not None,
                                   has_ref=kl_on, has_is_weight=call.rollout_is_weights is not None)
    tensors = (flat(old_logp) if old_logp is not None else adv, adv, flat(call.ref_logp) if kl_on else adv,
               flat(call.rollout_is_weights) if call.rollout_is_weights is not None else adv, agg_norm, row_len,
               mask.reshape(-1).contiguous())
    codes = (kernel_abi.METHOD_CODES[call.method.one_launch.code], kernel_abi.KL_CODES[k.kl_estimator if kl_on else "none"])
    return OneLaunchCall(call, dtype, tensors, codes, knobs, flags, compute_entropy)


def policy_loss_one_launch(logits, logits3, labels, flat_labels, old_logp, advantages, mask, method, temperature,
                           ignore_index, compute_entropy, backend, inplace_grad, kwargs) -> PolicyLossOutput:
    dtype = layout.compute_dtype(logits.dtype)
    run = prepare(labels, old_logp, advantages, mask, method, compute_entropy, kwargs, dtype)
    n = flat_labels.numel()
    logp = torch.empty(n, dtype=dtype, device=labels.device)
    entropy, loss_terms, pg_terms = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
    target = logits3.detach() if inplace_grad else torch.empty_like(logits3)
    with torch.no_grad():
        run.launch(logits3.detach(), flat_labels, 0, n, temperature, ignore_index, backend, logp, entropy,
                   loss_terms, pg_terms, target)
        loss_value, metrics = run.finish(logp, entropy, loss_terms, pg_terms, labels.shape)
    grad = target.view(logits.shape) if inplace_grad else target.reshape(logits.shape)
    loss = PrecomputedGrad.apply(loss_value, logits, grad)
    return PolicyLossOutput(loss, metrics)
