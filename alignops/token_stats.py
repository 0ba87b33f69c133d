"""token_logprobs: the log-probability of each label and the entropy, from the logits, in the
logits pass (alignops/logits/: one read of the logits forward, one read and one write backward)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignops._validate import renamed_keywords
from alignops.logits.passes import token_stats
from alignops.logits.sources import GivenLogits, check_logits_labels, resolve


class TokenLogprobs(NamedTuple):
    """What token_logprobs and fused_linear_token_logprobs return with `compute_entropy=True` (it unpacks as
    `logp, entropy = ...`). `logp`: the label's log-probability; `entropy`: the entropy of the distribution."""
    logp: Tensor
    entropy: Tensor


@renamed_keywords(return_entropy="compute_entropy")
def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100,
                   compute_entropy: bool = False, backend: str | None = None,
                   check_finite: bool = False, validate_labels: bool | None = None,
                   vocab_process_group=None, vocab_start: int | None = None):
    """Log-probability of each label under softmax(logits / temperature), and optionally the entropy.

    Args:
        logits: `[N, V]` or `[B, T, V]`, float32 / bfloat16 / float16 (float64 on the torch and cpu
            backends). Any strides; the vocabulary dimension should have unit stride (else copied).
        labels: integer tensor of shape `logits.shape[:-1]`; `ignore_index` marks positions to skip.
        temperature: the logits are divided by it inside the kernel (use the rollout temperature).
        compute_entropy: also return the entropy of softmax(logits / temperature) per position.
        backend: "torch", "cpu", "triton", "cuda" or None (automatic; see alignops._backend).
        check_finite: raise ValueError if logits hold NaN or inf (costs a reduction and a sync).
        validate_labels: check labels lie in [0, V); default: only for CPU tensors, where it costs
            no device synchronisation. Unchecked out-of-range labels give NaN log-probs.
        vocab_process_group: a torch.distributed group over which the vocabulary is sharded:
            `logits` are this rank's contiguous slice `[..., V_r]` (rank order), `labels` global ids,
            the same on every rank. One all_gather forward, none backward (alignops/logits/vocab_shard.py).
        vocab_start: this rank's first token id (the lower ranks' V_r summed); None gathers the sizes.

    Returns:
        `logp`, float32 (float64 for float64 logits), shaped like `labels`; with compute_entropy=True a
        `TokenLogprobs(logp, entropy)` (unpacks as `logp, entropy = ...`).
        Ignored positions hold 0 and receive no gradient. Both outputs are differentiable,
        separately and together; backward is one fused pass over the logits.
    """
    check_logits_labels(logits, labels)
    args = resolve(logits, labels, logits.shape[-1], temperature=temperature, ignore_index=ignore_index,
                   backend=backend, validate_labels=validate_labels, vocab_process_group=vocab_process_group,
                   vocab_start=vocab_start)
    # Over a shard the finiteness flag travels with the gather (every rank raises alike); elsewhere
    # it is checked here: a data-dependent branch, an asynchronous device assert under torch.compile.
    if check_finite and args.shard is None:
        if torch.compiler.is_compiling():
            torch._assert_async(torch.isfinite(logits).all(), "logits contain NaN or inf (check_finite=True)")
        elif not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or inf (check_finite=True)")
    logp, entropy = token_stats(GivenLogits(logits), args, bool(compute_entropy), bool(check_finite))
    return TokenLogprobs(logp, entropy) if compute_entropy else logp
