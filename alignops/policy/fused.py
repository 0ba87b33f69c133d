"""fused_policy_loss: policy_loss computed straight from the logits, in the logits pass of
alignops.token_stats (one read of the logits forward; one read and one write backward, for every
method, since the per-token math only changes the coefficients a = dL/dlogp and b = dL/dH that
the backward consumes).

Routes:
    default                the logits pass of token_logprobs, then policy_loss (torch.compile-traceable);
    inplace_grad=True      the gradient is written into the logits buffer (the logits are destroyed);
    grad_in_forward=True   the loss is terminal: a and b are taken during forward and the backward
                           kernel runs at once, so no logits are kept for backward; a token-local
                           method runs in one launch on cpu and triton (alignops/policy/one_launch.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignops import _backend, vocab_parallel
from alignops._validate import check_bool, is_number
from alignops.policy import one_launch
from alignops.policy.autograd import InplaceTokenStats, PrecomputedGrad, stats_backward, stats_forward
from alignops.policy.loss import PolicyLossOutput, policy_loss
from alignops.token_stats import LOGITS_OPS, as_rows, check_label_range, check_logits_labels, check_temperature, token_logprobs


def counted_tokens(labels, mask, ignore_index, compute_entropy, kwargs):
    """(mask, compute_entropy) of a policy loss from labels. A position counts iff mask != 0 and
    label != ignore_index, so mask=None means labels != ignore_index (an ignored position's logp is
    0, and against an off-policy old_logp it would otherwise enter the loss with a bogus ratio). A
    mask of the wrong shape or type is left to policy_loss, which names it. The entropy is computed
    when asked for or when the loss has an entropy bonus."""
    if compute_entropy is None:
        entropy_coef = kwargs.get("entropy_coef", 0.0)
        compute_entropy = is_number(entropy_coef) and entropy_coef != 0
    if mask is None:
        mask = labels != ignore_index
    elif isinstance(mask, Tensor) and tuple(mask.shape) == tuple(labels.shape) and mask.device == labels.device:
        mask = (mask if mask.dtype == torch.bool else mask != 0) & (labels != ignore_index)
    return mask, compute_entropy


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
        alignops/vocab_parallel.py. Every route works; grad_in_forward runs the two-pass kernels
        (the one-launch kernel would need the global log-prob inside the shard's pass).
    """
    check_logits_labels(logits, labels)
    temperature = check_temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_bool("inplace_grad", inplace_grad)
    check_bool("grad_in_forward", grad_in_forward)
    mask, compute_entropy = counted_tokens(labels, mask, ignore_index, compute_entropy, kwargs)
    sharded = vocab_process_group is not None or vocab_start is not None

    if not (inplace_grad or grad_in_forward):
        result = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                return_entropy=compute_entropy, backend=backend,
                                validate_labels=validate_labels, vocab_process_group=vocab_process_group,
                                vocab_start=vocab_start)
        logp, entropy = result if compute_entropy else (result, None)
        return policy_loss(logp, old_logp, advantages, mask, method=method, entropy=entropy, **kwargs)

    if torch.compiler.is_compiling():
        raise RuntimeError("inplace_grad / grad_in_forward are eager-only; use the default path under torch.compile")
    if validate_labels is None:
        validate_labels = labels.device.type == "cpu"
    if sharded:
        vocab_parallel.check_group_args(vocab_process_group, vocab_start)
    elif validate_labels:
        check_label_range(labels, logits.shape[-1], ignore_index)
    named = _backend.requested_backend(backend) is not None
    backend = _backend.resolve_backend(backend, logits.device, what=LOGITS_OPS)
    if logits.dtype == torch.float64 and backend in ("triton", "cuda"):
        raise TypeError(f"logits of dtype float64 are supported by the torch and cpu backends, not {backend!r}")
    logits3 = as_rows(logits)
    if inplace_grad and logits3.data_ptr() != logits.data_ptr():
        raise ValueError("inplace_grad=True needs logits with unit stride over the vocabulary")
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if sharded:
        shard = vocab_parallel.resolve_shard(vocab_process_group, vocab_start, logits.shape[-1], logits.device)
        return _sharded_policy_loss(logits, logits3, labels, flat_labels, old_logp, advantages, mask, method,
                                    temperature, ignore_index, compute_entropy, backend, inplace_grad,
                                    grad_in_forward, bool(validate_labels), needs_grad, shard, kwargs)
    if grad_in_forward and needs_grad and one_launch.eligible(method, kwargs, backend, compute_entropy, labels, named):
        return one_launch.policy_loss_one_launch(logits, logits3, labels, flat_labels, old_logp, advantages, mask,
                                                 method, temperature, ignore_index, compute_entropy, backend,
                                                 inplace_grad, kwargs)

    if not grad_in_forward:
        logp, _, entropy = InplaceTokenStats.apply(logits3, flat_labels, temperature, ignore_index,
                                                    compute_entropy, backend)
        return policy_loss(logp.view(labels.shape), old_logp, advantages, mask, method=method,
                           entropy=entropy.view(labels.shape) if compute_entropy else None, **kwargs)

    with torch.no_grad():
        logp, lse, entropy = stats_forward(logits3.detach(), flat_labels, temperature, ignore_index,
                                            compute_entropy, backend)

    def write_grad(a, b, target):
        stats_backward(logits3.detach(), flat_labels, logp, lse, entropy, a, a if b is None else b, temperature,
                       ignore_index, b is not None, backend, target)

    return _terminal_loss(logits, logits3, labels, logp, entropy if compute_entropy else None, needs_grad,
                          inplace_grad, write_grad, old_logp, advantages, mask, method, kwargs)


def _terminal_loss(logits, logits3, labels, logp, entropy, needs_grad, inplace_grad, write_grad, old_logp,
                   advantages, mask, method, kwargs) -> PolicyLossOutput:
    """grad_in_forward without the one-launch kernel: the loss from detached per-token log-probs (and
    entropy, or None), a = dL/dlogp and b = dL/dH by autograd, `write_grad(a, b or None, target)` fills
    dL/dlogits (into the logits when inplace_grad), and backward only scales it by grad_output."""
    logp_leaf = logp.view(labels.shape).detach().requires_grad_(needs_grad)
    ent_leaf = None if entropy is None else entropy.view(labels.shape).detach().requires_grad_(needs_grad)
    with torch.enable_grad():
        out = policy_loss(logp_leaf, old_logp, advantages, mask, method=method, entropy=ent_leaf, **kwargs)
    if not needs_grad:
        return PolicyLossOutput(out.loss.detach(), out.metrics)
    leaves = [logp_leaf] + ([] if ent_leaf is None else [ent_leaf])
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    flat = logp.reshape(-1)
    a = torch.zeros_like(flat) if grads[0] is None else grads[0].reshape(-1).contiguous().to(flat.dtype)
    b = grads[1].reshape(-1).contiguous().to(flat.dtype) if ent_leaf is not None and grads[1] is not None else None
    with torch.no_grad():
        target = logits3.detach() if inplace_grad else torch.empty_like(logits3)
        write_grad(a, b, target)
    grad = target.view(logits.shape) if inplace_grad else target.reshape(logits.shape)
    # detached: out.loss's graph was consumed by autograd.grad above and must not be revisited
    loss = PrecomputedGrad.apply(out.loss.detach(), logits, grad)
    return PolicyLossOutput(loss, out.metrics)


def _sharded_policy_loss(logits, logits3, labels, flat_labels, old_logp, advantages, mask, method, temperature,
                         ignore_index, compute_entropy, backend, inplace_grad, grad_in_forward, validate_labels,
                         needs_grad, shard, kwargs):
    """The inplace_grad / grad_in_forward routes over a vocabulary shard (alignops/vocab_parallel.py)."""
    if not grad_in_forward:
        logp, entropy = vocab_parallel.ShardedTokenStats.apply(logits3, flat_labels, shard, temperature, ignore_index,
                                                               compute_entropy, backend, validate_labels, False, True)
        return policy_loss(logp.view(labels.shape), old_logp, advantages, mask, method=method,
                           entropy=entropy.view(labels.shape) if compute_entropy else None, **kwargs)
    with torch.no_grad():
        st = vocab_parallel.gather_stats(logits3.detach(), flat_labels, shard, temperature, ignore_index,
                                         compute_entropy, backend, validate_labels=validate_labels)

    def write_grad(a, b, target):
        vocab_parallel.local_grad(logits3.detach(), st, a, b, temperature, backend, target)

    return _terminal_loss(logits, logits3, labels, st.logp, st.entropy if compute_entropy else None, needs_grad,
                          inplace_grad, write_grad, old_logp, advantages, mask, method, kwargs)
