"""The autograd pieces of fused_policy_loss's memory-saving routes: the logits pass whose backward
writes into the logits buffer, and a terminal loss whose gradient was computed during forward."""

from __future__ import annotations

import torch

from alignops import _backend
from alignops.reference import token_stats as reference


def stats_forward(logits3, labels, temperature, ignore_index, compute_entropy, backend):
    if backend == "torch":
        with torch.no_grad():
            return reference.token_stats(logits3.reshape(-1, logits3.shape[-1]), labels, temperature, ignore_index)
    n = labels.numel()
    out_dtype = torch.float64 if logits3.dtype == torch.float64 else torch.float32
    logp = torch.empty(n, dtype=out_dtype, device=logits3.device)
    lse, entropy = torch.empty_like(logp), torch.empty_like(logp)
    if n:
        _backend.kernel("token_stats_fwd", backend)(logits3, labels, 1.0 / temperature, ignore_index,
                                                    compute_entropy, logp, lse, entropy)
    return logp, lse, entropy


def stats_backward(logits3, labels, logp, lse, entropy, a, b, temperature, ignore_index, has_b, backend, out):
    if backend == "torch":
        reference.token_stats_grad(logits3, labels, logp, lse, entropy, a, b if has_b else torch.zeros_like(a),
                                   temperature, ignore_index, out)
    elif labels.numel():
        _backend.kernel("token_stats_bwd", backend)(logits3, labels, logp, lse, entropy, a, b,
                                                    1.0 / temperature, ignore_index, has_b, out)


class InplaceTokenStats(torch.autograd.Function):
    """token_stats whose backward writes dL/dlogits into the logits buffer itself."""

    @staticmethod
    def forward(ctx, logits3, labels, temperature, ignore_index, compute_entropy, backend):
        logp, lse, entropy = stats_forward(logits3, labels, temperature, ignore_index, compute_entropy, backend)
        ctx.save_for_backward(logits3, labels, logp, lse, entropy)
        ctx.args = (temperature, ignore_index, compute_entropy, backend)
        ctx.mark_non_differentiable(lse)
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        logits3, labels, logp, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, compute_entropy, backend = ctx.args
        a = torch.zeros_like(logp) if grad_logp is None else grad_logp.contiguous()
        has_b = compute_entropy and grad_entropy is not None
        b = grad_entropy.contiguous() if has_b else a
        stats_backward(logits3, labels, logp, lse, entropy, a, b, temperature, ignore_index, has_b,
                        backend, logits3)
        return logits3, None, None, None, None, None


class PrecomputedGrad(torch.autograd.Function):
    """A terminal loss whose gradient w.r.t. the logits was computed during forward."""

    @staticmethod
    def forward(ctx, loss, logits, grad_logits):
        ctx.save_for_backward(grad_logits)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad_logits,) = ctx.saved_tensors
        # the stored gradient is for grad_output = 1; scale it in place (no second [N, V] buffer)
        return None, grad_logits.mul_(grad_output.to(grad_logits.dtype)), None
