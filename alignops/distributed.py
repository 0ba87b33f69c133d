"""The collectives of the advantage estimators, one per call: a sum all-reduce of a few float64
counts, or an all_gather of (count, mean, M2) moments merged stably, so every rank ends up with
the global statistics.

Batch statistics are reduced once per call; group statistics are never reduced: a group must
live entirely on one rank (rollouts of one prompt are generated and scored together).
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_reduce_sum(moments: Tensor, process_group=None) -> Tensor:
    """Sums `moments` over the ranks of `process_group` in place (no-op for None) and returns it.

    `process_group` is a torch.distributed ProcessGroup (`torch.distributed.group.WORLD` for all
    ranks). Used for counts and plain sums; variances go through `merge_moments`.
    """
    if process_group is None:
        return moments
    import torch.distributed as dist  # noqa: PLC0415 - only when a group is given

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized; "
                         "call torch.distributed.init_process_group first (or pass process_group=None)")
    dist.all_reduce(moments, op=dist.ReduceOp.SUM, group=process_group)
    return moments


def merge_moments(stats: Tensor, process_group=None) -> Tensor:
    """Rows of (count or total weight, mean, M2 = sum of squared deviations), shape [..., 3]
    float64, merged over the ranks of `process_group` (no-op for None) with one all_gather.

    Means and M2 are merged through the deviations of the per-rank means (Chan et al.), never
    through a sum of squares: for data like 1000 +- 1e-3, sum(x^2) - sum(x)^2/n cancels twelve
    digits and leaves noise. Every rank merges the gathered rows in rank order, so all ranks get
    bitwise the same statistics.
    """
    if process_group is None:
        return stats
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized; "
                         "call torch.distributed.init_process_group first (or pass process_group=None)")
    stats = stats.contiguous()
    gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, stats, group=process_group)
    return merge_moment_rows(torch.stack(gathered))


def merge_moment_rows(parts: Tensor) -> Tensor:
    """Merges a stack `[R, ..., 3]` of (count or total weight, mean, M2) rows over its first dim
    into `[..., 3]`, in row order: the ranks' rows after merge_moments' all_gather, or the
    per-block partial moments of a kernel (kernels/advantages.py).

    Means and M2 go through the deviations of the row means (Chan et al.), never a sum of squares.
    """
    n = parts[..., 0].sum(0)
    mean = (parts[..., 0] * parts[..., 1]).sum(0) / n.clamp_min(1)
    dev = parts[..., 1] - mean
    m2 = parts[..., 2].sum(0) + (parts[..., 0] * dev * dev).sum(0)
    return torch.stack([n, mean, m2], dim=-1)
