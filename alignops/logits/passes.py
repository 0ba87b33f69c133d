"""The logits pass over a source of tiles (alignops/logits/sources.py), written once for given
logits and for hidden states x the lm_head weight, over the whole vocabulary or a shard of it.

    stats = forward_stats(source, args, compute_entropy)       logp, lse, entropy of every token
    grads = backward_into(source, args, stats, a, b)           dL/dz = a (1[v=y] - p) - b p (log p + H)
                                                               per tile, into the source's inputs
    logp, entropy = token_stats(source, args, compute_entropy) the same, with autograd

Over a vocabulary shard the tiles give local statistics, merged by one all_gather
(alignops/logits/vocab_shard.py), and the backward needs no collective but the fused lm_head's
all_reduce of dhidden.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from alignops.logits import vocab_shard
from alignops.logits.kernels import stat_rows, stats_backward, stats_forward, token_stats_op
from alignops.logits.sources import LogitsArgs


@dataclasses.dataclass
class Stats:
    """Per-token statistics of one call (over a shard: the whole vocabulary's, and `sharded` holds
    what this rank's backward needs)."""
    logp: Tensor
    lse: Tensor
    entropy: Tensor
    sharded: vocab_shard.ShardedStats | None = None


def forward_stats(source, args: LogitsArgs, compute_entropy: bool, check_finite: bool = False) -> Stats:
    labels, T, backend = args.labels, args.temperature, args.backend
    shard = args.shard
    if shard is not None:
        labels, owns = vocab_shard.shard_labels(args.labels, shard, args.ignore_index)
    ignore_index = args.ignore_index if shard is None else vocab_shard.LOCAL_IGNORE
    logp, lse, entropy = stat_rows(labels.numel(), source.dtype, source.device)
    # over a shard the flag travels with the gather, so every rank raises alike (unsharded callers check first)
    nonfinite = torch.zeros((), dtype=torch.bool, device=source.device) if check_finite and shard else None
    for s, e, tile, _ in source.tiles():
        if nonfinite is not None:
            nonfinite |= ~torch.isfinite(tile).all()
        stats_forward(tile, labels[s:e], T, ignore_index, compute_entropy, backend,
                      out=(logp[s:e], lse[s:e], entropy[s:e]))
    if shard is None:
        return Stats(logp, lse, entropy)
    st = vocab_shard.merge(logp, lse, entropy, labels, owns, shard, args.labels, args.ignore_index, compute_entropy,
                           validate_labels=args.validate_labels, nonfinite=nonfinite,
                           name_logits="logits" if source.traceable else "hidden @ weight.T")
    return Stats(st.logp, st.lse, st.entropy, st)


def backward_into(source, args: LogitsArgs, stats: Stats, a: Tensor, b: Tensor | None, want=None) -> tuple:
    """The gradients of the source's inputs for a = dL/dlogp and b = dL/dH (None: no entropy term);
    `want` says which inputs need one (default: all)."""
    source.start_grads((True,) * len(source.inputs) if want is None else want)
    for s, e, tile, deriv in source.tiles():
        g = source.grad_buffer(tile)
        bs = None if b is None else b[s:e]
        if stats.sharded is not None:
            vocab_shard.local_grad(tile, stats.sharded.rows(s, e), a[s:e], bs, args.temperature, args.backend, g)
        else:
            stats_backward(tile, args.labels[s:e], stats.logp[s:e], stats.lse[s:e], stats.entropy[s:e], a[s:e], bs,
                           args.temperature, args.ignore_index, args.backend, g)
        source.take_grad(s, e, g, deriv)
    return source.grads()


class LogitsPass(torch.autograd.Function):
    """(logp, entropy) of a source; backward is one more pass over its tiles (recomputed for the
    fused lm_head), writing into the logits themselves for an in-place source."""

    @staticmethod
    def forward(ctx, source, args, compute_entropy, check_finite, *inputs):
        with torch.no_grad():
            stats = forward_stats(source, args, compute_entropy, check_finite)
        sh = stats.sharded
        rows = () if sh is None else (sh.local_labels, sh.kernel_logp, sh.standin)
        ctx.save_for_backward(stats.logp, stats.lse, stats.entropy, *rows)
        ctx.source, ctx.args, ctx.compute_entropy = source, args, compute_entropy
        ctx.set_materialize_grads(False)
        return stats.logp, stats.entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logp, lse, entropy, *rows = ctx.saved_tensors
        n_inputs = len(ctx.source.inputs)
        if grad_logp is None and grad_entropy is None:
            return (None,) * (4 + n_inputs)
        sharded = vocab_shard.ShardedStats(logp, lse, entropy, *rows) if rows else None
        a = torch.zeros_like(logp) if grad_logp is None else grad_logp.to(logp.dtype)
        b = grad_entropy.to(logp.dtype) if (ctx.compute_entropy and grad_entropy is not None) else None
        with torch.no_grad():
            grads = backward_into(ctx.source, ctx.args, Stats(logp, lse, entropy, sharded), a, b,
                                  ctx.needs_input_grad[4:])
        return (None,) * 4 + tuple(grads)


class PrecomputedGrad(torch.autograd.Function):
    """A terminal loss whose gradients w.r.t. `inputs` were taken during forward (for
    grad_output = 1); backward scales them in place (no second buffer of their size)."""

    @staticmethod
    def forward(ctx, loss, n_inputs, *inputs_and_grads):
        ctx.n = n_inputs
        ctx.save_for_backward(*inputs_and_grads[n_inputs:])
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.saved_tensors]
        return (None, None, *grads) + (None,) * ctx.n


def token_stats(source, args: LogitsArgs, compute_entropy: bool, check_finite: bool = False):
    """(logp, entropy) shaped like the labels, with autograd. Given logits over the whole vocabulary
    go through the torch.library op (torch.compile traces it); every other source, in-place or
    sharded, through LogitsPass (eager only)."""
    if source.traceable and not source.inplace and args.shard is None:
        logp, _, entropy = token_stats_op(source.rows, args.labels, args.temperature, args.ignore_index,
                                          compute_entropy, args.backend)
    else:
        if torch.compiler.is_compiling():
            raise RuntimeError("inplace_grad, the fused lm_head and vocab_process_group are eager-only; use the "
                               "plain logits path under torch.compile")
        logp, entropy = LogitsPass.apply(source, args, compute_entropy, check_finite, *source.inputs)
    return logp.view(args.shape), entropy.view(args.shape)


def terminal_grads(source, args: LogitsArgs, stats: Stats, a: Tensor, b: Tensor | None) -> tuple:
    """The inputs' gradients of a terminal loss with coefficients a, b, taken now (no tile kept)."""
    want = [x is not None and x.requires_grad for x in source.inputs]
    with torch.no_grad():
        return backward_into(source, args, stats, a, b, want)


def precomputed(loss: Tensor, source, grads: tuple) -> Tensor:
    return PrecomputedGrad.apply(loss, len(source.inputs), *source.inputs, *grads)
