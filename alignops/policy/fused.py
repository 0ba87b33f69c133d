"""fused_policy_loss: policy_loss computed straight from the logits, in the logits pass
(alignops/logits/: one read of the logits forward; one read and one write backward, for every
method, since the per-token math only changes the coefficients a = dL/dlogp and b = dL/dH that
the backward consumes).

The three routes, each written once over a source of logits tiles (given logits here, hidden
states x the lm_head weight in alignops/fused_linear.py), over the whole vocabulary or a shard:
    autograd             the pass with autograd, then policy_loss (given logits: the torch.library op,
                         torch.compile-traceable; inplace_grad=True writes the gradient into the logits);
    terminal_two_pass    grad_in_forward=True: statistics, a and b by autograd on the per-token loss,
                         and the backward pass, all during forward; nothing is kept for backward;
    terminal_one_launch  grad_in_forward=True with a token-local method on cpu or triton: the method's
                         math runs inside the pass (alignops/policy/one_launch.py), one launch per tile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignops._validate import check_bool, is_number
from alignops.layout import POLICY_MASK_WEIGHTS, check_mask, compute_dtype
from alignops.logits import passes
from alignops.logits.sources import GivenLogits, LogitsArgs, check_logits_labels, resolve
from alignops.policy import one_launch
from alignops.policy.loss import PolicyCall, PolicyLossOutput, compute, policy_loss, prepare_call


def counted_tokens(labels, mask, ignore_index, compute_entropy, kwargs):
    """(mask, compute_entropy) of a policy loss from labels. A position counts iff mask is 1 and
    label != ignore_index, so mask=None means labels != ignore_index (an ignored position's logp is
    0, and against an off-policy old_logp it would otherwise enter the loss with a bogus ratio). The
    mask is checked (shape, device, 0/1 values: layout.check_mask, `validate_mask` as policy_loss's)
    before it is combined with the labels. The entropy is computed when asked for or when the loss
    has an entropy bonus."""
    if compute_entropy is None:
        entropy_coef = kwargs.get("entropy_coef", 0.0)
        compute_entropy = is_number(entropy_coef) and entropy_coef != 0
    if mask is None:
        return labels != ignore_index, compute_entropy
    mask = check_mask(mask, labels.shape, labels.device, "mask", validate=kwargs.get("validate_mask"),
                      weights=POLICY_MASK_WEIGHTS)
    return mask & (labels != ignore_index), compute_entropy


def fused_policy_loss(logits: Tensor, labels: Tensor, old_logp: Tensor | None, advantages: Tensor,
                      mask: Tensor | None = None, *, method: str = "grpo", temperature: float = 1.0,
                      ignore_index: int = -100, compute_entropy: bool | None = None,
                      backend: str | None = None, inplace_grad: bool = False, grad_in_forward: bool = False,
                      validate_labels: bool | None = None, vocab_process_group=None, vocab_start: int | None = None,
                      **kwargs) -> PolicyLossOutput:
    """policy_loss computed straight from the logits, in the logits pass of token_logprobs.

    `logits` are `[B, T, V]` with `labels [B, T]`, or packed `[N, V]` with `labels [N]` and
    `cu_seqlens`. Labels equal to `ignore_index` are masked out (whatever `mask` says; mask=None
    means `labels != ignore_index`). Every other keyword is
    policy_loss's. The entropy (and its gradient) is computed in the same pass when
    `entropy_coef != 0` or `compute_entropy=True` (which also reports the `entropy` metric).

    Equivalence (value and gradient w.r.t. the logits), on every backend:
        fused_policy_loss(logits, labels, ...) == policy_loss(token_logprobs(logits, labels), ...)

    inplace_grad=True: backward writes dL/dlogits into the logits' own storage (the logits are
        destroyed; `logits.grad` / the upstream gradient aliases the buffer). No [N, V] allocation.
    grad_in_forward=True: for a terminal loss (nothing else differentiates through these logits):
        a = dL/dlogp and b = dL/dH are taken during forward and the backward kernel runs at once,
        so the logits need not be kept; backward only scales by grad_output. Not traceable by
        torch.compile (it calls autograd inside forward); the default path is.
    vocab_process_group: the logits are this rank's shard `[..., V_r]` of a vocabulary sharded over
        the group (labels global ids, every per-token input the same on all ranks); see
        alignops/logits/vocab_shard.py. Every route works; grad_in_forward runs the two-pass kernels
        (the one-launch kernel would need the global log-prob inside the shard's pass).
    """
    check_logits_labels(logits, labels)
    check_bool("inplace_grad", inplace_grad)
    check_bool("grad_in_forward", grad_in_forward)
    args = resolve(logits, labels, logits.shape[-1], temperature=temperature, ignore_index=ignore_index,
                   backend=backend, validate_labels=validate_labels, vocab_process_group=vocab_process_group,
                   vocab_start=vocab_start)
    if (inplace_grad or grad_in_forward) and torch.compiler.is_compiling():
        raise RuntimeError("inplace_grad / grad_in_forward are eager-only; use the default path under torch.compile")
    return policy_loss_over(GivenLogits(logits, inplace_grad), args, old_logp, advantages, mask, method=method,
                            compute_entropy=compute_entropy, grad_in_forward=grad_in_forward, kwargs=kwargs)


def policy_loss_over(source, args: LogitsArgs, old_logp, advantages, mask, *, method, compute_entropy,
                     grad_in_forward, kwargs) -> PolicyLossOutput:
    """The policy loss of a source's logits by the route that applies (module docstring)."""
    mask, compute_entropy = counted_tokens(args.labels.view(args.shape), mask, args.ignore_index, compute_entropy,
                                           kwargs)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in source.inputs)
    if not (grad_in_forward and needs_grad):
        logp, entropy = passes.token_stats(source, args, compute_entropy)
        return policy_loss(logp, old_logp, advantages, mask, method=method,
                           entropy=entropy if compute_entropy else None, **kwargs)
    call = prepare_call(args.labels.view(args.shape), old_logp, advantages, mask, method=method,
                        has_entropy=compute_entropy, **kwargs)
    # an on-policy rollout_logp route needs the pass's log-probs before its weights exist: two passes
    if call.rollout is None and one_launch.kernel_applies(call, args.backend, args.named, args.shard is not None):
        return terminal_one_launch(source, args, call, compute_entropy)
    return terminal_two_pass(source, args, call, compute_entropy)


def terminal_two_pass(source, args: LogitsArgs, call: PolicyCall, compute_entropy: bool) -> PolicyLossOutput:
    """The statistics, then a and b by autograd on the per-token loss, then the backward pass."""
    with torch.no_grad():
        stats = passes.forward_stats(source, args, compute_entropy)
    logp = stats.logp.view(args.shape).detach().requires_grad_()
    entropy = stats.entropy.view(args.shape).detach().requires_grad_() if compute_entropy else None
    with torch.enable_grad():
        out = compute(call, logp, entropy)
    leaves = [logp] + ([entropy] if compute_entropy else [])
    got = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    a = torch.zeros_like(stats.logp) if got[0] is None else got[0].reshape(-1).to(stats.logp.dtype)
    b = got[1].reshape(-1).to(stats.logp.dtype) if compute_entropy and got[1] is not None else None
    grads = passes.terminal_grads(source, args, stats, a, b)
    # detached: out.loss's graph was consumed by autograd.grad above and must not be revisited
    return PolicyLossOutput(passes.precomputed(out.loss.detach(), source, grads), out.metrics)


def terminal_one_launch(source, args: LogitsArgs, call: PolicyCall, compute_entropy: bool) -> PolicyLossOutput:
    """The method's per-token math inside the pass: one kernel launch per tile writes the tile's
    gradient, which the source turns into its inputs' at once."""
    run = one_launch.prepare(call, compute_entropy, compute_dtype(source.dtype))
    source.start_grads([x is not None and x.requires_grad for x in source.inputs])
    with torch.no_grad():
        for s, e, tile, deriv in source.tiles():
            g = source.grad_buffer(tile)
            run.launch(tile, args.labels[s:e], s, e, args, g)
            source.take_grad(s, e, g, deriv)
        loss, metrics = run.finish(args.shape)
    return PolicyLossOutput(passes.precomputed(loss, source, source.grads()), metrics)
