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
from alignops.policy import kernel_abi
from alignops.policy.loss import PolicyCall, metrics
from alignops.policy.registry import one_launch_knobs


def kernel_applies(call: PolicyCall, backend: str, named: bool, sharded: bool) -> bool:
    """Whether the one-launch kernel computes this prepared call: a token-local method (and options)
    on the cpu or triton backend, over the whole vocabulary (a shard would need the global log-prob
    inside its pass). A kernel that fails to load raises when the backend was named, else warns once,
    naming the cause, and the two-pass kernels run."""
    one_launch = call.method.one_launch
    if backend not in ("cpu", "triton") or sharded or one_launch is None or not one_launch.applies(call.options):
        return False
    _, reason = _backend.kernel_or_reason("policy_loss_fused", backend)
    if reason is not None:
        msg = f"the one-launch policy kernel (policy_loss_fused, backend {backend!r}) cannot be loaded: {reason}"
        if named:
            raise _backend.BackendUnavailableError(
                f"backend={backend!r}: {msg}; pass grad_in_forward=False, or name no backend to fall back to "
                "the two-pass kernels")
        _backend.warn_once(f"alignops: {msg}; grad_in_forward=True runs the two-pass kernels instead", stacklevel=5)
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
    outputs: tuple        # logp, entropy, loss_terms, pg_terms: [N] each, written by the launches

    def launch(self, tile, labels, s, e, args, grad_logits) -> None:
        """Rows s:e of the flat tokens, whose logits are `tile` [1 or B, T, V] (their labels `labels`),
        with the pass's temperature, ignore_index and backend (`args`); writes the outputs' s:e."""
        if e <= s:
            return
        ins = [t[s:e] for t in self.tensors]
        outs = [t[s:e] for t in self.outputs]
        _backend.kernel("policy_loss_fused", args.backend)(
            tile, labels, *ins, *self.codes, self.knobs, self.flags, 1.0 / args.temperature, args.ignore_index,
            self.compute_entropy, *outs, grad_logits)

    def finish(self, shape) -> tuple[torch.Tensor, dict]:
        """(loss, metrics). The loss and pg_loss are the kernel's: each token's share of them (its
        weight (coef / normaliser) / row length included) summed in float64, so the order of the
        sum costs no digits. The other metrics come from torch on the kernel's logp and entropy: O(N)."""
        logp, entropy, loss_terms, pg_terms = self.outputs
        loss = loss_terms.sum(dtype=torch.float64).to(self.dtype)
        pg = pg_terms.sum(dtype=torch.float64).to(self.dtype)
        return loss, metrics(self.call, logp.view(shape), entropy.view(shape) if self.compute_entropy else None, pg)


def prepare(call: PolicyCall, compute_entropy: bool, dtype: torch.dtype) -> OneLaunchCall:
    """Lays out the kernel's per-token inputs of a prepared call."""
    k, rows, mask = call.knobs, call.rows, call.mask
    n = mask.numel()
    # The kernel forms each term's weight as (coef / normaliser) / row length, the order autograd
    # takes through layout.aggregate, so a and b match the two-pass path's.
    agg_norm = call.norm(dtype).expand(mask.shape).reshape(-1).contiguous()
    if k.agg == "seq-mean-token-mean":
        row_len = rows.to_tokens(rows.lengths(mask, dtype).clamp(min=1)).reshape(-1).contiguous()
    else:
        row_len = torch.ones(n, dtype=dtype, device=mask.device)

    def flat(x):
        return layout.sanitize(x.detach(), mask, dtype).reshape(-1).contiguous()

    adv = flat(call.advantages)
    kl_on = k.kl_coef > 0
    knobs, flags = kernel_abi.pack(one_launch_knobs(call.method, call.options, k), has_old=call.old_logp is not None,
                                   has_ref=kl_on, has_is_weight=call.rollout_is_weights is not None)
    tensors = (flat(call.old_logp) if call.old_logp is not None else adv, adv,
               flat(call.ref_logp) if kl_on else adv,
               flat(call.rollout_is_weights) if call.rollout_is_weights is not None else adv, agg_norm, row_len,
               mask.reshape(-1).contiguous())
    codes = (kernel_abi.METHOD_CODES[call.method.one_launch.code], kernel_abi.KL_CODES[k.kl_estimator if kl_on else "none"])
    outputs = tuple(torch.empty(n, dtype=dtype, device=mask.device) for _ in range(4))
    return OneLaunchCall(call, dtype, tensors, codes, knobs, flags, compute_entropy, outputs)
