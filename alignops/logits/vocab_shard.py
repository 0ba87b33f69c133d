"""The logits pass over a vocabulary sharded across the ranks of a process group (Megatron's layout):
each rank holds a contiguous slice of the vocabulary, in rank order, of its logits `[..., V_r]` or of
the lm_head rows `weight [V_r, H]`; labels, hidden states and every per-token input are the same on
every rank, and labels are global token ids.

    logp, H = ao.token_logprobs(local_logits, labels, compute_entropy=True, vocab_process_group=tp_group)
    out = ao.fused_linear_policy_loss(hidden, local_weight, labels, old_logp, adv, mask,
                                      vocab_process_group=tp_group)

Forward: the existing kernels run on the shard with the labels shifted into it (a row whose label
lives on another rank reads local column 0 as a stand-in) and give per-row local (lse_r, H_r,
logp_r); ONE all_gather of `[N + 1, 4]` float64 rows (lse_r, H_r, logp_r, owns label; the last row
the shard's (start, size, non-finite flag)) is merged in rank order, so every rank gets bitwise the
same global statistics:

    lse = logsumexp_r lse_r,   log w_r = lse_r - lse,   logp = logp_owner + log w_owner,
    H = sum_r w_r (H_r - log w_r)      (the entropy of a mixture: no lse - sum p*z cancellation).

Backward needs no collective for the logits: dL/dz_v = a (1[v=y] - p_v) - b p_v (log p_v + H) is
local given the global (lse, H); the stand-in column's label term is overwritten with its true value.
The fused lm_head sums dhidden = sum_r g_r @ W_r with one all_reduce (LinearHead in sources.py).
This module is the shard math alone, below the pass over a shard (passes.py); it imports only the kernels.

`vocab_start=None` finds the shard's offset with one all_gather of the shard sizes per call (a host
synchronisation); pass `vocab_start` (the sum of the lower ranks' shard sizes) to skip it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from alignops.logits.kernels import stats_backward

# The kernels' ignore_index for shard-local labels: those lie in [0, V_r), so -1 never collides with
# a shifted label (a user ignore_index inside another shard's range would).
LOCAL_IGNORE = -1


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, start + size) of the vocabulary."""
    group: object
    rank: int
    world: int
    start: int
    size: int


def _dist():
    import torch.distributed as dist  # noqa: PLC0415 - only when a group is given
    return dist


def check_group_args(vocab_process_group, vocab_start) -> None:
    """Errors that need no collective (raised alike on every rank)."""
    if vocab_process_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start was given without vocab_process_group")
        return
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_process_group was given but torch.distributed is not initialized; "
                         "call torch.distributed.init_process_group first (or pass vocab_process_group=None)")
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        raise ValueError(f"vocab_start must be a non-negative int (the sum of the lower ranks' shard sizes), "
                         f"got {vocab_start!r}")
    if torch.compiler.is_compiling():
        raise RuntimeError("vocab_process_group is eager-only (its collective is not traced by torch.compile)")


def resolve_shard(vocab_process_group, vocab_start, size: int, device: torch.device) -> VocabShard:
    """This rank's shard; with vocab_start=None its offset comes from one all_gather of the sizes."""
    check_group_args(vocab_process_group, vocab_start)
    dist = _dist()
    rank = dist.get_rank(vocab_process_group)
    if rank < 0:
        raise ValueError("vocab_process_group does not contain this rank")
    world = dist.get_world_size(vocab_process_group)
    if vocab_start is None:
        mine = torch.tensor([size], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(sizes, mine, group=vocab_process_group)
        vocab_start = int(sum(int(s) for s in sizes[:rank]))
    return VocabShard(vocab_process_group, rank, world, vocab_start, size)


def shard_labels(labels: Tensor, shard: VocabShard, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(labels for the shard's kernels, owns): the shifted label where this shard holds it, column 0
    (a stand-in whose label term backward overwrites) where another rank does, LOCAL_IGNORE where
    ignored. labels: flat int64."""
    valid = labels != ignore_index
    shifted = labels - shard.start
    owns = valid & (shifted >= 0) & (shifted < shard.size)
    local = torch.where(owns, shifted, torch.zeros_like(shifted))
    return torch.where(valid, local, torch.full_like(local, LOCAL_IGNORE)), owns


@dataclasses.dataclass
class ShardedStats:
    """Global per-row statistics (identical on every rank) and what this rank's backward needs."""
    logp: Tensor
    lse: Tensor
    entropy: Tensor
    local_labels: Tensor
    kernel_logp: Tensor  # the global log-prob of the local label (the stand-in's where not owned)
    standin: Tensor      # rows whose local label is the stand-in column

    def rows(self, s: int, e: int) -> "ShardedStats":
        return ShardedStats(*(getattr(self, f.name)[s:e] for f in dataclasses.fields(self)))


def merge(local_logp: Tensor, local_lse: Tensor, local_entropy: Tensor, local_labels: Tensor, owns: Tensor,
          shard: VocabShard, labels: Tensor, ignore_index: int, compute_entropy: bool, *,
          validate_labels: bool, nonfinite: Tensor | None = None, name_logits: str = "logits") -> ShardedStats:
    """The one collective of the forward and the rank-order merge of its rows (module docstring)."""
    dist = _dist()
    n = labels.numel()
    dtype, device = local_lse.dtype, local_lse.device
    rows = torch.empty(n + 1, 4, dtype=torch.float64, device=device)
    rows[:n, 0] = local_lse
    rows[:n, 1] = local_entropy
    rows[:n, 2] = local_logp
    rows[:n, 3] = owns
    rows[n, 0], rows[n, 1], rows[n, 3] = shard.start, shard.size, 0.0
    rows[n, 2] = 0.0 if nonfinite is None else nonfinite.to(torch.float64)
    parts = [torch.empty_like(rows) for _ in range(shard.world)]
    dist.all_gather(parts, rows, group=shard.group)
    parts = torch.stack(parts)  # [R, N + 1, 4]

    if validate_labels or nonfinite is not None:
        _check_layout(parts[:, n].tolist(), labels, ignore_index, validate_labels, name_logits)

    lse_r, ent_r, logp_r, own_r = parts[:, :n, 0], parts[:, :n, 1], parts[:, :n, 2], parts[:, :n, 3] > 0.5
    top = lse_r.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    rel = lse_r - top  # <= 0; exactly 0 at the largest shard
    first_top = rel.argmax(0)
    # log(sum_r exp(rel_r)) as log1p of the terms other than the largest one (which is exactly 1):
    # exact near logp = 0, where log(1 + tiny) would keep only ulp(1).
    others = torch.zeros_like(top)
    for r in range(shard.world):  # rank order: every rank sums the same terms in the same order
        others = others + torch.where(first_top == r, torch.zeros_like(top), rel[r].exp())
    log_norm = torch.log1p(others)
    lse = lse_r.max(0).values + log_norm
    log_w = rel - log_norm

    valid = local_labels != LOCAL_IGNORE
    logp = torch.zeros_like(top)
    n_owners = torch.zeros_like(top)
    entropy = torch.zeros_like(top)
    for r in range(shard.world):
        # an owner shard of -inf logits holds p_y = 0 (its local logp is NaN)
        term = torch.where(torch.isneginf(log_w[r]), log_w[r], logp_r[r] + log_w[r])
        logp = logp + torch.where(own_r[r], term, torch.zeros_like(top))
        n_owners = n_owners + own_r[r].to(top.dtype)
        if compute_entropy:
            w = log_w[r].exp()
            entropy = entropy + torch.where(w > 0, w * (ent_r[r] - log_w[r]), torch.zeros_like(top))
    # a label no shard holds (outside the global vocabulary, unchecked) gives NaN, as a single shard does
    logp = torch.where(n_owners == 1, logp, torch.full_like(logp, float("nan")))
    zero = torch.zeros_like(top)
    me = shard.rank
    own_logp = torch.where(torch.isneginf(log_w[me]), log_w[me], logp_r[me] + log_w[me])
    return ShardedStats(
        logp=torch.where(valid, logp, zero).to(dtype),
        lse=torch.where(valid, lse, zero).to(dtype),
        entropy=torch.where(valid, entropy, zero).to(dtype),
        local_labels=local_labels,
        kernel_logp=torch.where(valid, own_logp, zero).to(dtype),
        standin=valid & ~owns,
    )


def _check_layout(shards, labels, ignore_index, validate_labels, name_logits):
    """Every rank sees the same gathered rows, so these errors are raised on all ranks alike."""
    starts, sizes, nonfinite = [int(s[0]) for s in shards], [int(s[1]) for s in shards], [s[2] for s in shards]
    if any(f > 0 for f in nonfinite):
        bad = [r for r, f in enumerate(nonfinite) if f > 0]
        raise ValueError(f"{name_logits} contain NaN or inf (check_finite=True) on the shards of ranks {bad}")
    if not validate_labels:
        return
    expected = 0
    for r, (start, size) in enumerate(zip(starts, sizes)):
        if start != expected:
            raise ValueError(f"vocab_start: rank {r} of vocab_process_group starts its shard at {start}, but the "
                             f"lower ranks' shards end at {expected} (shards are contiguous, in rank order)")
        expected += size
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= expected))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {expected}) (the vocabulary of all shards of vocab_process_group) "
                         f"or equal ignore_index={ignore_index}; found {labels[bad][0].item()}")


def local_grad(logits3: Tensor, st: ShardedStats, a: Tensor, b: Tensor | None, temperature: float, backend: str,
               out: Tensor) -> None:
    """dL/dlogits of the shard into `out` ([B, T, V_r], may alias logits3) given the global
    statistics and a = dL/dlogp, b = dL/dH (None: no entropy gradient). No collective."""
    stats_backward(logits3, st.local_labels, st.kernel_logp, st.lse, st.entropy, a, b, temperature, LOCAL_IGNORE,
                   backend, out)
    # The stand-in column got the label term a; its true gradient is -p0 (a + b (log p0 + H)), written
    # from the row's statistics (no cancellation; elementwise, so no host sync).
    lp0 = st.kernel_logp
    p0 = lp0.exp()
    coef = a if b is None else a + b * (lp0 + st.entropy)
    g0 = torch.where(p0 > 0, -p0 * coef, torch.zeros_like(p0)) / temperature
    col = out[..., 0]
    col.copy_(torch.where(st.standin.view(col.shape), g0.to(out.dtype).view(col.shape), col))


def all_reduce_hidden_grad(dh: Tensor | None, shard: VocabShard | None) -> None:
    """dhidden = sum_r g_r @ W_r: the one collective of the fused lm_head's backward."""
    if dh is not None and shard is not None and shard.world > 1:
        _dist().all_reduce(dh, op=_dist().ReduceOp.SUM, group=shard.group)
