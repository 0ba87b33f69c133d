"""The logits pass: token log-probs, log-sum-exp and entropy over `[tokens, vocab]` logits, one read
forward and one read plus one write backward, that every objective of alignops stands on.

    kernels.py   the kernel contract every backend implements, and its torch.library ops
    sources.py   the call's arguments, resolved once, and where the logits tiles come from: given
                 logits, or hidden states x the lm_head weight in chunks
    vocab_shard.py  the math of a vocabulary sharded over ranks (Megatron's layout): the
                 shard's labels, the one all_gather and rank-order merge, the shard's gradient
    passes.py    the pass over a source (over a vocabulary shard too): statistics, the backward
                 into the source's inputs, and the autograd Functions

The public functions built on it are alignops.token_stats.token_logprobs,
alignops.policy.fused.fused_policy_loss and alignops.fused_linear. This file imports nothing.
"""
