"""Every alignops objective straight from hidden states and the lm_head weight: the `[tokens, vocab]`
logits never exist.

    logp, H = ao.fused_linear_token_logprobs(hidden, lm_head.weight, labels, compute_entropy=True)
    out = ao.fused_linear_policy_loss(hidden, lm_head.weight, labels, old_logp, advantages, mask, method="grpo")

The tokens are processed in chunks of `chunk_size` rows: a chunk's logits tile
`z = hidden_c @ weight.T (+ bias)` (then `* logit_scale`, then `softcap * tanh(z / softcap)`) goes
through the logits pass (alignops/logits/) on the chosen backend, and the tile is dropped.
Backward recomputes each tile, turns it into dL/dz in place (the token_stats backward kernel)
and accumulates `dhidden = g @ weight`, `dweight += g.T @ hidden` (fp32 accumulator) and
`dbias += g.sum(0)`. The tile is the GEMM's fp32 accumulator, never rounded to the inputs' bf16 or
fp16 (as in verl's and Liger's kernels). Extra memory: one fp32 tile (on CPU, for half-precision
inputs, also a 32 MB fp32 block of weight rows) and the fp32 dweight accumulator when the weight
is not fp32.

Terminal losses (`grad_in_forward=True`) take the gradients during forward, so nothing is saved:
a token-local method on the cpu or triton backend runs the one-launch policy kernel on each tile
(three GEMMs in all: logits, dhidden, dweight); any other method takes dL/dlogp and dL/dH from a
first pass and recomputes the tiles once (four GEMMs).

Each function equals its logits path in value and gradient (dhidden, dweight, dbias):
    fused_linear_token_logprobs(h, W, y, ...)  == token_logprobs(transform(h @ W.T + b), y, ...)
    fused_linear_policy_loss(h, W, y, ...)     == fused_policy_loss(transform(h @ W.T + b), y, ...)
where, for bf16/fp16 inputs, the logits are the fp32 product (`h.float() @ W.float().T`): the
fused path is more precise than logits materialised in bf16, not equal to them.
"""

from __future__ import annotations

from torch import Tensor

from alignops._validate import check_bool, renamed_keywords
from alignops.logits import passes
from alignops.logits.sources import LinearHead, check_head, resolve
from alignops.policy.fused import policy_loss_over
from alignops.policy.loss import PolicyLossOutput
from alignops.token_stats import TokenLogprobs


def linear_source(hidden, weight, labels, *, bias, temperature, ignore_index, softcap, logit_scale, backend,
                  chunk_size, validate_labels, vocab_process_group, vocab_start, reduce_hidden_grad=True):
    """(the lm_head as a source of logits tiles, the pass's arguments), checked once."""
    check_head(hidden, weight, labels, bias)
    check_bool("reduce_hidden_grad", reduce_hidden_grad)
    if not reduce_hidden_grad and vocab_process_group is None:
        raise ValueError("reduce_hidden_grad=False leaves dhidden as this rank's partial sum over a vocabulary "
                         "shard: it needs vocab_process_group")
    args = resolve(hidden, labels, weight.shape[0], temperature=temperature, ignore_index=ignore_index,
                   backend=backend, validate_labels=validate_labels, vocab_process_group=vocab_process_group,
                   vocab_start=vocab_start, name="hidden")
    return LinearHead(hidden, weight, bias, softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size,
                      shard=args.shard, reduce_hidden_grad=reduce_hidden_grad), args


# --------------------------------------------------------------------------------------------
# public API


@renamed_keywords(return_entropy="compute_entropy")
def fused_linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                                temperature: float = 1.0, ignore_index: int = -100, compute_entropy: bool = False,
                                softcap: float | None = None, logit_scale: float | None = None,
                                backend: str | None = None, chunk_size: int | None = None,
                                validate_labels: bool | None = None, vocab_process_group=None,
                                vocab_start: int | None = None, reduce_hidden_grad: bool = True):
    """token_logprobs of the logits `hidden @ weight.T + bias` without forming them.

    Args:
        hidden: `[B, T, H]` or `[N, H]` (fp32, bf16, fp16; fp64 on torch and cpu), with autograd.
        weight: `[V, H]` (lm_head.weight, possibly tied to the embedding), same dtype; a weight
            with requires_grad=False costs no dweight GEMM. bias: `[V]` or None.
        labels: like `hidden` without H; `ignore_index` positions hold 0 and get no gradient.
        temperature, ignore_index, compute_entropy, backend: as token_logprobs.
        softcap, logit_scale: the head's own transform, z = softcap * tanh(z * logit_scale / softcap)
            (Gemma's final soft-capping, Cohere's scale), before the temperature.
        chunk_size: rows per tile (default: a 64 MiB fp32 tile, at least 512 rows).
        vocab_process_group, vocab_start: `weight` (and `bias`) are this rank's contiguous rows
            `[V_r, H]` of an lm_head sharded over the group's vocabulary (labels global ids, hidden
            the same on every rank): one all_gather forward, one all_reduce of dhidden backward
            (alignops/logits/vocab_shard.py). vocab_start: this rank's first row; None gathers the sizes.
        reduce_hidden_grad: with vocab_process_group, False returns this rank's partial dhidden
            (sum over its own rows only) for a caller that sums it itself: Megatron's layout, where
            the hidden states reach the lm_head through a region whose backward all-reduces (sequence
            parallel off) or reduce-scatters (sequence parallel on) over the tensor-parallel group.
            True (default): dhidden is summed here, for hidden states given alike on every rank.

    Returns:
        `logp`, fp32 (fp64 for fp64 inputs), shaped like `labels`; with compute_entropy=True a
        `TokenLogprobs(logp, entropy)`.
    """
    check_bool("compute_entropy", compute_entropy)
    source, args = linear_source(hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
                                 softcap=softcap, logit_scale=logit_scale, backend=backend, chunk_size=chunk_size,
                                 validate_labels=validate_labels, vocab_process_group=vocab_process_group,
                                 vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad)
    logp, entropy = passes.token_stats(source, args, compute_entropy)
    return TokenLogprobs(logp, entropy) if compute_entropy else logp


def fused_linear_policy_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor | None,
                             advantages: Tensor, mask: Tensor | None = None, *, method: str = "grpo",
                             bias: Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                             softcap: float | None = None, logit_scale: float | None = None,
                             compute_entropy: bool | None = None, backend: str | None = None,
                             grad_in_forward: bool = False, chunk_size: int | None = None,
                             validate_labels: bool | None = None, vocab_process_group=None,
                             vocab_start: int | None = None, reduce_hidden_grad: bool = True,
                             **kwargs) -> PolicyLossOutput:
    """fused_policy_loss of the logits `hidden @ weight.T + bias`, without forming them.

    Every keyword of policy_loss applies (method options, KL, entropy bonus, aggregation,
    normalizer, cu_seqlens, ...); mask=None means `labels != ignore_index`, and ignored labels are
    masked out whatever `mask` says. grad_in_forward=True: a terminal loss whose gradients are
    taken during forward (no tile is kept): the one-launch kernel per tile for token-local methods
    on cpu and triton (three GEMMs), else a first pass for dL/dlogp and dL/dH and one recompute.
    vocab_process_group, vocab_start, reduce_hidden_grad: as fused_linear_token_logprobs (a sharded
    lm_head); every route works, grad_in_forward with the first-pass-and-recompute path.
    """
    check_bool("grad_in_forward", grad_in_forward)
    source, args = linear_source(hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
                                 softcap=softcap, logit_scale=logit_scale, backend=backend, chunk_size=chunk_size,
                                 validate_labels=validate_labels, vocab_process_group=vocab_process_group,
                                 vocab_start=vocab_start, reduce_hidden_grad=reduce_hidden_grad)
    return policy_loss_over(source, args, old_logp, advantages, mask, method=method, compute_entropy=compute_entropy,
                            grad_in_forward=grad_in_forward, kwargs=kwargs)


@renamed_keywords(reduction="agg")
def fused_linear_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor | None = None,
                                   agg: str = "sum", *, bias: Tensor | None = None,
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
        labels, mask, agg, cu_seqlens, ignore_index, return_lengths, tokens=hidden, name="hidden")


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
