"""Every alignops objective straight from hidden states and the lm_head weight: the `[tokens, vocab]`
logits never exist.

    logp, H = ao.fused_linear_token_logprobs(hidden, lm_head.weight, labels, return_entropy=True)
    out = ao.fused_linear_policy_loss(hidden, lm_head.weight, labels, old_logp, advantages, mask, method="grpo")

The tokens are processed in chunks of `chunk_size` rows: a chunk's logits tile
`z = hidden_c @ weight.T (+ bias)` (then `* logit_scale`, then `softcap * tanh(z / softcap)`) goes
through the logits pass of alignops.token_stats on the chosen backend, and the tile is dropped.
Backward recomputes each tile, turns it into dL/dz in place (the token_stats backward kernel)
and accumulates `dhidden = g @ weight`, `dweight += g.T @ hidden` (fp32 accumulator) and
`dbias += g.sum(0)`. Extra memory: one tile (plus its fp32 copy for half-precision inputs or a
transform) and the fp32 dweight accumulator when the weight is not fp32.

Terminal losses (`grad_in_forward=True`) take the gradients during forward, so nothing is saved:
a token-local method on the cpu or triton backend runs the one-launch policy kernel on each tile
(three GEMMs in all: logits, dhidden, dweight); any other method takes dL/dlogp and dL/dH from a
first pass and recomputes the tiles once (four GEMMs).

Each function equals its logits path in value and gradient (dhidden, dweight, dbias):
    fused_linear_token_logprobs(h, W, y, ...)  == token_logprobs(transform(h @ W.T + b), y, ...)
    fused_linear_policy_loss(h, W, y, ...)     == fused_policy_loss(transform(h @ W.T + b), y, ...)
with the tile computed in the hidden states' dtype, as the logits are (the transform in fp32).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from alignops import _backend, layout, vocab_parallel
from alignops._validate import check_bool, check_float
from alignops.policy import one_launch
from alignops.policy.autograd import stats_backward, stats_forward
from alignops.policy.fused import counted_tokens
from alignops.policy.loss import PolicyLossOutput, compute, policy_loss, prepare_call
from alignops.token_stats import LOGITS_OPS, check_label_range, check_temperature

# Bytes of one logits tile (fp32): the chunk is the number of rows that fits, but never fewer than
# MIN_ROWS: every chunk re-reads the whole weight and rewrites the whole fp32 dweight, so at
# V = 151936 a 96-row tile made the fused path 2x the bare GEMMs where 512 rows make it ~1.2x
# (bench/results/fused_linear-cpu2.md, docs/benchmarks.md).
TILE_BYTES = 64 << 20
MIN_ROWS = 512


# --------------------------------------------------------------------------------------------
# arguments


@dataclasses.dataclass(frozen=True)
class Head:
    """The lm_head and the logits transform: z = softcap * tanh((h @ W.T + b) * logit_scale / softcap) / T."""
    weight: Tensor
    bias: Tensor | None
    temperature: float
    softcap: float | None
    logit_scale: float | None
    ignore_index: int
    backend: str
    chunk: int
    shard: vocab_parallel.VocabShard | None = None  # the lm_head rows are this rank's vocabulary shard
    validate_labels: bool = False                    # against the global vocabulary, after the gather


def _check_head(hidden, weight, labels, bias, temperature, softcap, logit_scale, ignore_index, backend,
                chunk_size, validate_labels, vocab_process_group=None, vocab_start=None) -> tuple[Tensor, Tensor, Head]:
    """(hidden as [N, H], labels as flat int64 [N], the head)."""
    for name, x in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (the nn.Linear layout of lm_head), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must be [V] = ({weight.shape[0]},) of the weight's dtype and device, "
                             f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden shape {tuple(hidden.shape)} "
                         "without its last dimension")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    temperature = check_temperature(temperature)
    softcap = check_float("softcap", softcap, lo=0.0, allow_none=True)
    logit_scale = check_float("logit_scale", logit_scale, allow_none=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    V = weight.shape[0]
    if chunk_size is None:
        chunk = max(MIN_ROWS, min(4096, TILE_BYTES // (4 * V) // 16 * 16))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    else:
        chunk = chunk_size
    if validate_labels is None:
        validate_labels = labels.device.type == "cpu"
    sharded = vocab_process_group is not None or vocab_start is not None
    if sharded:
        vocab_parallel.check_group_args(vocab_process_group, vocab_start)
    elif validate_labels:
        check_label_range(labels, V, ignore_index)
    backend = _backend.resolve_backend(backend, hidden.device, what=LOGITS_OPS)
    if hidden.dtype == torch.float64 and backend in ("triton", "cuda"):
        raise TypeError(f"hidden of dtype float64 is supported by the torch and cpu backends, not {backend!r}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    shard = vocab_parallel.resolve_shard(vocab_process_group, vocab_start, V, hidden.device) if sharded else None
    head = Head(weight, bias, temperature, softcap, logit_scale, ignore_index, backend, chunk, shard,
                bool(validate_labels))
    return h2, labels.reshape(-1).to(torch.int64).contiguous(), head


# --------------------------------------------------------------------------------------------
# tiles


def _spans(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _tile(h: Tensor, head: Head) -> tuple[Tensor, Tensor | float]:
    """The chunk's logits tile as [1, C, V] (unit stride over V) and dz_out/dz_raw (a tensor for
    softcap, else the scale). Computed in the hidden states' dtype, as the logits would be; a
    transform runs in fp32 on an fp32 copy."""
    raw = torch.mm(h, head.weight.t())
    if head.bias is not None:
        raw += head.bias
    if head.softcap is None and head.logit_scale is None:
        return raw.unsqueeze(0), 1.0
    z = raw.to(torch.promote_types(raw.dtype, torch.float32))
    scale = 1.0 if head.logit_scale is None else head.logit_scale
    if head.logit_scale is not None:
        z.mul_(scale)
    if head.softcap is None:
        return z.unsqueeze(0), scale
    t = torch.tanh(z / head.softcap)
    deriv = (1.0 - t * t).mul_(scale)
    return (t.mul_(head.softcap)).unsqueeze(0), deriv


class _Grads:
    """Accumulates dhidden, dweight (fp32 unless float64) and dbias over the chunks."""

    def __init__(self, h: Tensor, head: Head, want_h: bool, want_w: bool, want_b: bool):
        self.h, self.head = h, head
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        self.dh = torch.empty_like(h) if want_h else None
        self.dw = torch.zeros(head.weight.shape, dtype=acc, device=h.device) if want_w else None
        self.db = torch.zeros(head.weight.shape[0], dtype=acc, device=h.device) if want_b else None

    def add(self, s: int, e: int, g_tile: Tensor, deriv) -> None:
        """g_tile: dL/dz of rows s:e as [1, C, V]; deriv: what _tile returned."""
        g = g_tile[0]
        if isinstance(deriv, Tensor) or deriv != 1.0:
            g.mul_(deriv)  # the tile is ours: the chain rule through the transform in place
        # the tile's gradient in the hidden states' dtype, as autograd would hand it to the GEMMs
        g = g.to(self.h.dtype)
        if self.dh is not None:
            torch.mm(g, self.head.weight, out=self.dh[s:e])
        if self.dw is not None:
            gt, hc = (g, self.h[s:e]) if g.dtype == self.dw.dtype else (g.to(self.dw.dtype), self.h[s:e].to(self.dw.dtype))
            self.dw.addmm_(gt.t(), hc)
        if self.db is not None:
            self.db += g.sum(0, dtype=self.db.dtype)

    def result(self):
        vocab_parallel.all_reduce_hidden_grad(self.dh, self.head.shard)
        w = self.head.weight
        dw = None if self.dw is None else self.dw.to(w.dtype)
        db = None if self.db is None else self.db.to(w.dtype)
        return self.dh, dw, db


def _stat_rows(n: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Empty (logp, lse, entropy) rows: fp32, fp64 for fp64 hidden states."""
    logp = torch.empty(n, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32, device=h.device)
    return logp, torch.empty_like(logp), torch.empty_like(logp)


def _stats(h: Tensor, labels: Tensor, head: Head, compute_entropy: bool):
    """(logp, lse, entropy) of every token, one tile at a time, and over a vocabulary shard the
    ShardedStats of the one gather after the last tile (else None)."""
    if head.shard is not None:
        return _sharded_stats(h, labels, head, compute_entropy)
    n = labels.numel()
    logp, lse, entropy = _stat_rows(n, h)
    for s, e in _spans(n, head.chunk):
        tile, _ = _tile(h[s:e], head)
        lp, ls, en = stats_forward(tile, labels[s:e], head.temperature, head.ignore_index, compute_entropy,
                                   head.backend)
        logp[s:e], lse[s:e], entropy[s:e] = lp, ls, en
    return logp, lse, entropy, None


def _sharded_stats(h, labels, head, compute_entropy):
    local_labels, owns = vocab_parallel.shard_labels(labels, head.shard, head.ignore_index)
    n = labels.numel()
    logp, lse, entropy = _stat_rows(n, h)
    for s, e in _spans(n, head.chunk):
        tile, _ = _tile(h[s:e], head)
        logp[s:e], lse[s:e], entropy[s:e] = vocab_parallel.local_stats(tile, local_labels[s:e], head.temperature,
                                                                         compute_entropy, head.backend)
    st = vocab_parallel.merge(logp, lse, entropy, local_labels, owns, head.shard, labels, head.ignore_index,
                              compute_entropy, validate_labels=head.validate_labels, name_logits="hidden @ weight.T")
    return st.logp, st.lse, st.entropy, st


def _backward_pass(h, labels, head, logp, lse, entropy, a, b, grads: _Grads, sharded=None) -> None:
    """Recomputes every tile and accumulates the GEMMs of dL/dz = token_stats' backward(a, b)
    (over a vocabulary shard: vocab_parallel.local_grad with the gathered statistics `sharded`)."""
    has_b = b is not None
    for s, e in _spans(labels.numel(), head.chunk):
        tile, deriv = _tile(h[s:e], head)
        if sharded is not None:
            vocab_parallel.local_grad(tile, sharded.rows(s, e), a[s:e], b[s:e] if has_b else None,
                                      head.temperature, head.backend, tile)
            grads.add(s, e, tile, deriv)
            continue
        stats_backward(tile, labels[s:e], logp[s:e], lse[s:e], entropy[s:e], a[s:e].contiguous(),
                       (b if has_b else a)[s:e].contiguous(), head.temperature, head.ignore_index, has_b,
                       head.backend, tile)
        grads.add(s, e, tile, deriv)


class _LinearTokenStats(torch.autograd.Function):
    """(logp, entropy) from hidden states; backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, head, compute_entropy):
        with torch.no_grad():
            logp, lse, entropy, sharded = _stats(h, labels, head, compute_entropy)
        shard_rows = () if sharded is None else (sharded.local_labels, sharded.kernel_logp, sharded.standin)
        ctx.save_for_backward(h, weight, bias, labels, logp, lse, entropy, *shard_rows)
        ctx.head, ctx.compute_entropy = head, compute_entropy
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, bias, labels, logp, lse, entropy, *shard_rows = ctx.saved_tensors
        sharded = vocab_parallel.ShardedStats(logp, lse, entropy, *shard_rows) if shard_rows else None
        want = ctx.needs_input_grad
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        a = torch.zeros_like(logp) if grad_logp is None else grad_logp.to(logp.dtype)
        b = grad_entropy.to(logp.dtype) if (ctx.compute_entropy and grad_entropy is not None) else None
        grads = _Grads(h, ctx.head, want[0], want[1], want[2] and bias is not None)
        with torch.no_grad():
            _backward_pass(h, labels, ctx.head, logp, lse, entropy, a, b, grads, sharded)
        dh, dw, db = grads.result()
        return dh, dw, db, None, None, None


class _PrecomputedLinearGrad(torch.autograd.Function):
    """A terminal loss whose gradients w.r.t. hidden, weight and bias were taken during forward."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, dh, dw, db):
        ctx.save_for_backward(dh, dw, db)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        dh, dw, db = ctx.saved_tensors
        # the stored gradients are for grad_output = 1; scaled in place (no second [V, H] buffer)
        scale = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in (dh, dw, db)]
        return None, scale[0], scale[1], scale[2], None, None, None


# --------------------------------------------------------------------------------------------
# public API


def fused_linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                                temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                                softcap: float | None = None, logit_scale: float | None = None,
                                backend: str | None = None, chunk_size: int | None = None,
                                validate_labels: bool | None = None, vocab_process_group=None,
                                vocab_start: int | None = None):
    """token_logprobs of the logits `hidden @ weight.T + bias` without forming them.

    Args:
        hidden: `[B, T, H]` or `[N, H]` (fp32, bf16, fp16; fp64 on torch and cpu), with autograd.
        weight: `[V, H]` (lm_head.weight, possibly tied to the embedding), same dtype; a weight
            with requires_grad=False costs no dweight GEMM. bias: `[V]` or None.
        labels: like `hidden` without H; `ignore_index` positions hold 0 and get no gradient.
        temperature, ignore_index, return_entropy, backend: as token_logprobs.
        softcap, logit_scale: the head's own transform, z = softcap * tanh(z * logit_scale / softcap)
            (Gemma's final soft-capping, Cohere's scale), before the temperature.
        chunk_size: rows per tile (default: a 64 MiB fp32 tile, at least 512 rows).
        vocab_process_group, vocab_start: `weight` (and `bias`) are this rank's contiguous rows
            `[V_r, H]` of an lm_head sharded over the group's vocabulary (labels global ids, hidden
            the same on every rank): one all_gather forward, one all_reduce of dhidden backward
            (alignops/vocab_parallel.py). vocab_start: this rank's first row; None gathers the sizes.

    Returns:
        `logp` (and `entropy`), fp32 (fp64 for fp64 inputs), shaped like `labels`.
    """
    check_bool("return_entropy", return_entropy)
    h2, flat, head = _check_head(hidden, weight, labels, bias, temperature, softcap, logit_scale, ignore_index,
                                 backend, chunk_size, validate_labels, vocab_process_group, vocab_start)
    logp, entropy = _LinearTokenStats.apply(h2, weight, bias, flat, head, return_entropy)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def fused_linear_policy_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor | None,
                             advantages: Tensor, mask: Tensor | None = None, *, method: str = "grpo",
                             bias: Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                             softcap: float | None = None, logit_scale: float | None = None,
                             compute_entropy: bool | None = None, backend: str | None = None,
                             grad_in_forward: bool = False, chunk_size: int | None = None,
                             validate_labels: bool | None = None, vocab_process_group=None,
                             vocab_start: int | None = None, **kwargs) -> PolicyLossOutput:
    """fused_policy_loss of the logits `hidden @ weight.T + bias`, without forming them.

    Every keyword of policy_loss applies (method options, KL, entropy bonus, aggregation,
    normalizer, cu_seqlens, ...); mask=None means `labels != ignore_index`, and ignored labels are
    masked out whatever `mask` says. grad_in_forward=True: a terminal loss whose gradients are
    taken during forward (no tile is kept): the one-launch kernel per tile for token-local methods
    on cpu and triton (three GEMMs), else a first pass for dL/dlogp and dL/dH and one recompute.
    vocab_process_group, vocab_start: as fused_linear_token_logprobs (a sharded lm_head); every
    route works, grad_in_forward with the first-pass-and-recompute path.
    """
    check_bool("grad_in_forward", grad_in_forward)
    h2, flat, head = _check_head(hidden, weight, labels, bias, temperature, softcap, logit_scale, ignore_index,
                                 backend, chunk_size, validate_labels, vocab_process_group, vocab_start)
    mask, compute_entropy = counted_tokens(labels, mask, ignore_index, compute_entropy, kwargs)

    params = (hidden, weight) + (() if bias is None else (bias,))
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if not (grad_in_forward and needs_grad):
        logp, entropy = _LinearTokenStats.apply(h2, weight, bias, flat, head, compute_entropy)
        return policy_loss(logp.view(labels.shape), old_logp, advantages, mask, method=method,
                           entropy=entropy.view(labels.shape) if compute_entropy else None, **kwargs)

    grads = _Grads(h2, head, hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    named = _backend.requested_backend(backend) is not None
    # over a vocabulary shard the per-token math needs the gathered log-probs: the two-pass path
    if head.shard is None and one_launch.eligible(method, kwargs, head.backend, compute_entropy, labels, named):
        loss, metrics = _one_launch(h2, flat, labels, old_logp, advantages, mask, method, compute_entropy, head,
                                    kwargs, grads)
    else:
        loss, metrics = _two_pass_terminal(h2, flat, labels, old_logp, advantages, mask, method, compute_entropy,
                                           head, kwargs, grads)
    dh, dw, db = grads.result()
    dh = None if dh is None else dh.view(hidden.shape)
    loss = _PrecomputedLinearGrad.apply(loss, hidden, weight, bias, dh, dw, db)
    return PolicyLossOutput(loss, metrics)


def _two_pass_terminal(h2, flat, labels, old_logp, advantages, mask, method, compute_entropy, head, kwargs, grads):
    with torch.no_grad():
        logp, lse, entropy, sharded = _stats(h2, flat, head, compute_entropy)
    logp_leaf = logp.view(labels.shape).detach().requires_grad_()
    ent_leaf = entropy.view(labels.shape).detach().requires_grad_() if compute_entropy else None
    with torch.enable_grad():
        out = policy_loss(logp_leaf, old_logp, advantages, mask, method=method, entropy=ent_leaf, **kwargs)
    leaves = [logp_leaf] + ([ent_leaf] if compute_entropy else [])
    got = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    a = torch.zeros_like(logp) if got[0] is None else got[0].reshape(-1).to(logp.dtype)
    b = got[1].reshape(-1).to(logp.dtype) if compute_entropy and got[1] is not None else None
    with torch.no_grad():
        _backward_pass(h2, flat, head, logp, lse, entropy, a, b, grads, sharded)
    return out.loss.detach(), out.metrics


def _one_launch(h2, flat, labels, old_logp, advantages, mask, method, compute_entropy, head, kwargs, grads):
    dtype = torch.float64 if h2.dtype == torch.float64 else torch.float32
    run = one_launch.prepare(labels, old_logp, advantages, mask, method, compute_entropy, kwargs, dtype)
    n = flat.numel()
    logp = torch.empty(n, dtype=dtype, device=h2.device)
    entropy, loss_terms, pg_terms = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
    with torch.no_grad():
        for s, e in _spans(n, head.chunk):
            tile, deriv = _tile(h2[s:e], head)
            run.launch(tile, flat[s:e], s, e, head.temperature, head.ignore_index, head.backend, logp, entropy,
                       loss_terms, pg_terms, tile)
            grads.add(s, e, tile, deriv)
        loss, metrics = run.finish(logp, entropy, loss_terms, pg_terms, labels.shape)
    return loss, metrics


def fused_linear_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor | None = None,
                                   reduction: str = "sum", *, bias: Tensor | None = None,
                                   cu_seqlens: Tensor | None = None, temperature: float = 1.0,
                                   ignore_index: int = -100, softcap: float | None = None,
                                   logit_scale: float | None = None, return_lengths: bool = False,
                                   backend: str | None = None, chunk_size: int | None = None,
                                   vocab_process_group=None, vocab_start: int | None = None):
    """sequence_logprobs of `hidden @ weight.T + bias` (DPO, ORPO, GVPO, iw-SFT), without the logits."""
    from alignops import sft  # noqa: PLC0415 - sft imports the logits pass only
    return sft.sequence_logprobs_from(
        lambda lab: fused_linear_token_logprobs(hidden, weight, lab, bias, temperature, ignore_index,
                                                softcap=softcap, logit_scale=logit_scale, backend=backend,
                                                chunk_size=chunk_size, vocab_process_group=vocab_process_group,
                                                vocab_start=vocab_start),
        labels, mask, reduction, cu_seqlens, ignore_index, return_lengths, tokens=hidden, name="hidden")


def fused_linear_sft_loss(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor | None = None,
                          weighting: str = "none", seq_weights: Tensor | None = None, *, bias: Tensor | None = None,
                          cutoff_prob: float | None = None, normalizer=None, cu_seqlens: Tensor | None = None,
                          temperature: float = 1.0, ignore_index: int = -100, softcap: float | None = None,
                          logit_scale: float | None = None, backend: str | None = None,
                          chunk_size: int | None = None, vocab_process_group=None, vocab_start: int | None = None):
    """sft_loss (SFT, DFT, CHORD-phi, iw-SFT) of `hidden @ weight.T + bias`, without the logits."""
    from alignops import sft  # noqa: PLC0415
    return sft.sft_loss_from(
        lambda lab: fused_linear_token_logprobs(hidden, weight, lab, bias, temperature, ignore_index,
                                                softcap=softcap, logit_scale=logit_scale, backend=backend,
                                                chunk_size=chunk_size, vocab_process_group=vocab_process_group,
                                                vocab_start=vocab_start),
        labels, mask, weighting, seq_weights, cutoff_prob, normalizer, cu_seqlens, ignore_index, tokens=hidden,
        name="hidden")
