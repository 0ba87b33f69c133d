"""Data parallelism of the reference trainer: the ranks torchrun starts, which groups each rank
samples, and the few collectives that make N ranks take the same steps as one process holding the
whole global batch.

    torchrun --nproc_per_node 2 -m alignops.train --method grpo --num_prompts 16   # gloo on CPU
    torchrun --nproc_per_node 8 -m alignops.train --method grpo --device cuda      # nccl, cuda:LOCAL_RANK

Each rank holds num_prompts / world_size whole groups (a group's rows are compared with each
other, so they live on one rank). The losses are divided by the global batch's denominators
(all-reduced), so the sum of the ranks' gradients, which `sum_gradients` forms, is the gradient of
the whole batch; every rank then takes the same optimiser step and the parameters never drift.
Run alone (no WORLD_SIZE in the environment, or WORLD_SIZE=1) every function here is the identity.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from alignops.distributed import all_reduce_sum


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the job. `group` is torch.distributed's WORLD group when there is
    more than one rank, None alone (alignops' estimators and losses take it as `process_group`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None
    device: str = "cpu"               # where the collectives' buffers live (nccl needs CUDA tensors)
    owns_process_group: bool = False  # init_process_group was called here: destroyed by shutdown

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


ALONE = Ranks()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init(device: str) -> tuple[Ranks, str]:
    """(Ranks, device) of this process: the distributed job torchrun describes through RANK /
    WORLD_SIZE / LOCAL_RANK (the process group initialised here, gloo for a CPU `device`, nccl
    on cuda:LOCAL_RANK for `device` "cuda"), the one already initialised by the caller, or ALONE."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return ALONE, device
        return Ranks(dist.get_rank(), world, _env_int("LOCAL_RANK", 0), dist.group.WORLD, device), device
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return ALONE, device
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for {world} ranks but this torch build has no torch.distributed")
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"under torchrun pass --device cuda (each rank takes cuda:LOCAL_RANK), got {device!r}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device {device!r} has no distributed backend here; use cpu (gloo) or cuda (nccl)")
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Ranks(rank, world, local_rank, dist.group.WORLD, device, owns_process_group=True), device


def shutdown(ranks: Ranks, wait: bool = True) -> None:
    """Destroys the process group `init` created; `wait`: after every rank got here (a failing
    rank does not wait for ranks that may never arrive)."""
    if ranks.owns_process_group:
        import torch.distributed as dist  # noqa: PLC0415
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def group_range(num_groups: int, ranks: Ranks) -> range:
    """The global indices of the groups this rank samples: an equal, contiguous share."""
    if num_groups % ranks.world_size:
        raise ValueError(f"num_prompts={num_groups} groups do not split evenly over {ranks.world_size} ranks: "
                         f"num_prompts must be a multiple of the world size")
    per_rank = num_groups // ranks.world_size
    return range(ranks.rank * per_rank, (ranks.rank + 1) * per_rank)


def all_sum(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum over the ranks of `x` (a new float64 tensor: counts stay exact), `x` alone."""
    out = x.detach().to(torch.float64).clone()
    return all_reduce_sum(out, ranks.group) if ranks.distributed else out


def all_max(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    out = x.detach().to(torch.float64).clone()
    if ranks.distributed:
        import torch.distributed as dist  # noqa: PLC0415
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=ranks.group)
    return out


def gather_rows(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The ranks' equal-length per-row tensors concatenated in rank order (= global row order)."""
    if not ranks.distributed:
        return x
    import torch.distributed as dist  # noqa: PLC0415
    y = x.detach().to(torch.float64).contiguous()  # gloo gathers no bool tensors
    parts = [torch.empty_like(y) for _ in range(ranks.world_size)]
    dist.all_gather(parts, y, group=ranks.group)
    return torch.cat(parts).to(x.dtype)


def broadcast(obj, ranks: Ranks):
    """Rank 0's `obj` (any picklable value) on every rank."""
    if not ranks.distributed:
        return obj
    import torch.distributed as dist  # noqa: PLC0415
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=ranks.group)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist  # noqa: PLC0415
        dist.barrier(group=ranks.group)


def sum_gradients(params, ranks: Ranks) -> None:
    """Replaces each parameter's gradient by its sum over the ranks, in one all-reduce of one
    flat buffer. The losses carry the global normaliser, so the sum is the whole batch's gradient
    (a mean would divide it by world_size). A parameter without a gradient on this rank (its
    mini-batch share was empty) contributes zeros and gets the sum too."""
    if not ranks.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                      for p in params])
    all_reduce_sum(flat, ranks.group)
    offset = 0
    for p in params:
        n = p.numel()
        piece = flat[offset:offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.copy_(piece)
        offset += n


def reduce_metrics(sums: dict, maxima: dict, ranks: Ranks) -> tuple[dict, dict]:
    """(sums, maxima) of named scalars reduced over the ranks: SUM for the first, MAX for the
    second. A rank whose share of a mini-batch was empty has no entries; the names are agreed
    first (keys missing on a rank count as 0, resp. -inf)."""
    if not ranks.distributed:
        return sums, maxima
    import torch.distributed as dist  # noqa: PLC0415
    names = [None] * ranks.world_size
    dist.all_gather_object(names, (sorted(sums), sorted(maxima)), group=ranks.group)
    sum_keys = sorted({k for s, _ in names for k in s})
    max_keys = sorted({k for _, m in names for k in m})
    s = torch.tensor([float(sums.get(k, 0.0)) for k in sum_keys], dtype=torch.float64, device=ranks.device)
    m = torch.tensor([float(maxima.get(k, -math.inf)) for k in max_keys], dtype=torch.float64, device=ranks.device)
    if sum_keys:
        all_reduce_sum(s, ranks.group)
    if max_keys:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ranks.group)
    return dict(zip(sum_keys, s.tolist())), dict(zip(max_keys, m.tolist()))


def mean_over_ranks(metrics: dict, ranks: Ranks) -> dict:
    """Per-step metrics that are means over this rank's rows, averaged over the ranks: every rank
    holds the same number of rows, so this is the mean over the global batch."""
    if not ranks.distributed or not metrics:
        return metrics
    keys = sorted(metrics)
    x = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=ranks.device)
    all_reduce_sum(x, ranks.group)
    return {k: v / ranks.world_size for k, v in zip(keys, x.tolist())}


def broadcast_parameters(module: torch.nn.Module, ranks: Ranks) -> None:
    """Rank 0's parameters and buffers on every rank: the ranks start from the same weights
    whatever their own initialisation drew."""
    if not ranks.distributed:
        return
    import torch.distributed as dist  # noqa: PLC0415
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0, group=ranks.group)
